"""The testbed end to end with a guest kernel that panics on purpose: the run must end within
seconds of the panic (not at --timeout), exit 123, print the trace, and name the test or
command that was running. It boots the real testbed (about 10-20 s each, building the image
first if the cache has none), so it needs qemu-system-aarch64 on this host.

The trigger is sysrq 'c' through /proc/sysrq-trigger, with panic=0 on the guest kernel's
command line: the guest kernel then hangs after its panic instead of rebooting, which is
the case a fault detector exists for (without it the run waits for its time limit). It
is safe: it crashes only the emulated guest, whose root file system is discarded anyway.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # the testbed's --timeout: the run must end long before it

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                       reason="needs qemu-system-aarch64 (apt-get install qemu-system-arm) to boot the testbed"),
    pytest.mark.skipif(os.environ.get("KVMITS_TESTBED") == "1", reason="already inside the testbed"),
]


def run_testbed(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "testbed"), "run", "--no-make",
                           "--append", "panic=0", "--timeout", str(TIMEOUT), *args],
                          cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT + 120)
    return proc, time.monotonic() - t0


def test_a_panic_in_a_pytest_test_fails_that_test():
    proc, seconds = run_testbed("-e", "KVMITS_TESTBED_FAULT_CASE=1", "--", "python3", "-m", "pytest",
                            "-p", "no:cacheprovider", "tests/tools/guest_fault_case.py")
    detail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 123, detail
    assert seconds < 120, detail            # the time limit is 300 s
    assert ("FAILED tests/tools/guest_fault_case.py::test_the_guest_kernel_panics - guest kernel "
            "fault: Kernel panic - not syncing: sysrq triggered crash") in proc.stdout, detail
    assert "KVMITS-TESTBED-RUNNING" not in proc.stdout, detail
    assert ("guest kernel fault (panic) in test tests/tools/guest_fault_case.py::"
            "test_the_guest_kernel_panics") in proc.stderr, detail
    assert "Call trace:" in proc.stderr and "---[ end Kernel panic - not syncing" in proc.stderr, detail


def test_a_panic_in_a_plain_command_names_the_command():
    proc, seconds = run_testbed("-q", "--", "sh", "-c", "echo before; echo c > /proc/sysrq-trigger")
    detail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 123, detail
    assert seconds < 120, detail
    assert "before" in proc.stdout and "FAILED" not in proc.stdout, detail
    assert ("guest kernel fault (panic) while running sh -c 'echo before; echo c > /proc/sysrq-trigger': "
            "Kernel panic - not syncing: sysrq triggered crash") in proc.stderr, detail
    assert "write_sysrq_trigger" in proc.stderr, detail   # the trace itself
