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


#: with virtio devices: the disk written before the migration is read back after it (page cache
#: dropped: the read goes to the device, on the new VM), and the rng answers on both sides; each
#: is a virtio_pci driver in mid-life whose MSI-X vectors the new VM must route through its ITS
VIRTIO_JOB = """
dd if=/dev/urandom of=/tmp/p bs=4096 count=16 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=4096 count=16 conv=fsync 2>/dev/null && echo "written"
echo "rng-before=$(dd if=/dev/hwrng bs=16 count=2 2>/dev/null | wc -c)"
""" + JOB + """
sync; echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/r bs=4096 count=16 2>/dev/null
echo "disk-after=$(md5sum < /tmp/r | cut -d' ' -f1) $(md5sum < /tmp/p | cut -d' ' -f1)"
dd if=/dev/urandom of=/dev/vda bs=4096 seek=16 count=4 conv=fsync 2>/dev/null && echo "written-after"
echo "rng-after=$(dd if=/dev/hwrng bs=16 count=2 2>/dev/null | wc -c)"
"""


def run_migrating(guest, tmp_path, src, dst, job, extra=()):
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(guest.initrd(job))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "kvmits", "run", str(guest.image), "--cpus", "2", "--mem", "256M",
                          "--its", src, "--initrd", str(initrd), "--append", CMDLINE, *extra,
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
    return lines


@pytest.fixture
def guest():
    found = LinuxGuest.find()
    if found is None:
        pytest.skip(LinuxGuest.why_missing())
    return found


@pytest.mark.parametrize("src, dst", [("kernel", "user"), ("user", "kernel")])
def test_a_linux_guest_carries_on_after_migrating_to_the_other_its(arm64_kvm, guest, tmp_path, src, dst):
    run_migrating(guest, tmp_path, src, dst, JOB)


@pytest.mark.parametrize("src, dst", [("kernel", "user"), ("user", "kernel")])
def test_virtio_blk_and_rng_carry_on_after_migrating(arm64_kvm, guest, tmp_path, src, dst):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    lines = run_migrating(guest, tmp_path, src, dst, VIRTIO_JOB, ("--disk", str(disk), "--rng"))
    assert "written" in lines and "rng-before=32" in lines, lines
    after = [ln for ln in lines if ln.startswith("disk-after=")]
    assert after and len(set(after[0].split("=", 1)[1].split())) == 1, after     # the same bytes read back
    assert "written-after" in lines and "rng-after=32" in lines, lines
    data = disk.read_bytes()
    assert data[:65536] != bytes(65536) and data[65536:65536 + 16384] != bytes(16384)     # both writes landed
