"""`kvmits run` boots the same guest program with either ITS: its console on stdout, the exit
status from the guest's shutdown (PSCI SYSTEM_OFF -> 0)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.arm64


@pytest.mark.parametrize("its", ["kernel", "user"])
def test_kvmits_run_hello(arm64_kvm, its):
    from kvmits.machine.agent import guest_program

    out = subprocess.run([sys.executable, "-m", "kvmits", "run", "--its", its, "--cpus", "2",
                          str(guest_program("hello"))],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "kvmits hello: running at EL1" in out.stdout and "(FDT magic ok)" in out.stdout
    assert out.stdout.rstrip().endswith("powering off")
