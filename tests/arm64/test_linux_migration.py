"""A Linux guest migrated live between the two ITSes by `kvmits run --migrate-on` (issue 13).

The job asks for migration with a console line and waits for a key on the console, as the
migration tests of ITS test suites do (kvm-unit-tests' arm/gic.c); `kvmits run --migrate-on
REGEX --migrate-its KIND --then-send TEXT` migrates the running VM into a new one with the other
ITS when the line appears and then types the key. Linux then carries on there: its timer
(sleep), its other CPU (an IPI through the redistributors: taskset), its console, and the
poweroff at the end of the job, on the new machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmits.lab.linux_guest import GuestReport, LinuxGuest

pytestmark = pytest.mark.arm64

TIMEOUT = 300
CMDLINE = "console=ttyAMA0 quiet panic=-1"
JOB = """
echo "KVMITS-MIGRATE-NOW: migrate the VM, then press a key"
read -r key < /dev/console
echo "key=$key"
for c in 0 1; do taskset -c $c sh -c 'echo cpu-ok' ; done
sleep 1
echo slept
"""


@pytest.mark.parametrize("src, dst", [("kernel", "user"), ("user", "kernel")])
def test_a_linux_guest_carries_on_after_migrating_to_the_other_its(arm64_kvm, tmp_path, src, dst):
    guest = LinuxGuest.find()
    if guest is None:
        pytest.skip(LinuxGuest.why_missing())
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(guest.initrd(JOB))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "kvmits", "run", str(guest.image), "--cpus", "2", "--mem", "256M",
                          "--its", src, "--initrd", str(initrd), "--append", CMDLINE,
                          "--migrate-on", "^KVMITS-MIGRATE-NOW", "--migrate-its", dst, "--then-send", "go\\n",
                          "--timeout", str(TIMEOUT)],
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT + 60, cwd=root, check=False)
    err = out.stderr.decode(errors="replace")
    report = GuestReport.parse(out.stdout)
    assert out.returncode == 0, (err[-2000:], report.problem())
    m = re.search(rf"migrated \({src} -> {dst} ITS\), downtime ([\d.]+) ms", err)
    assert m, err[-2000:]
    lines = report.check().output.split("\n")
    assert "key=go" in lines and lines.count("cpu-ok") == 2 and "slept" in lines, report.output
