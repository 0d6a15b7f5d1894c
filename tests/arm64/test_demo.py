"""`kvmits demo` on arm64 KVM: both ITSes, the same LPIs, and a JSON result with every figure."""

import json
import subprocess
import sys

import pytest

from kvmits.cli.demo import ROWS

pytestmark = pytest.mark.arm64


def test_demo_json(arm64_kvm):
    out = subprocess.run([sys.executable, "-m", "kvmits", "demo", "--cpus", "2", "--events", "4", "--json"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["same_lpis"] is True
    for mode in ("kernel", "user"):
        assert set(result[mode]) == {key for key, *_ in ROWS}
        assert all(v > 0 for v in result[mode].values())
