"""kvmits' pytest plugin on arm64 KVM (issue 17): its arm64_machine fixture boots a guest with
each ITS, and `kvmits test` runs a user's file natively here (no testbed inside the testbed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from kvmits.machine.agent import guest_program

ROOT = Path(__file__).resolve().parents[2]


def test_arm64_machine_boots_hello_with_each_its(arm64_machine, its_kind):
    assert arm64_machine.config.its == its_kind
    arm64_machine.load(guest_program("hello"))
    result = arm64_machine.run(60)
    assert result.reason == "poweroff", result
    assert b"kvmits hello: running at EL1" in arm64_machine.uart.out.getvalue()


def test_kvmits_test_runs_natively_on_an_arm64_host(arm64_kvm, tmp_path):
    shutil.copy(ROOT / "examples" / "tests" / "test_first_its.py", tmp_path / "test_first_its.py")
    out = subprocess.run([sys.executable, "-m", "kvmits", "test", "test_first_its.py", "--its", "user"],
                         cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
                         check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-2000:])
    assert "3 passed" in out.stdout and "running pytest in the arm64 testbed" not in out.stderr
    assert "kvmits: ITS kinds user, 4 vCPUs" in out.stdout
