"""A Linux guest's own drivers on kvmits' PCI devices, with each ITS (issue 12): virtio_pci,
virtio_blk and virtio-rng on the PCIe host bridge, Linux's ITS driver mapping their MSI-X vectors
(MAPD, MAPTI, MOVI), every completion interrupt going device thread -> eventfd -> KVM -> ITS ->
LPI. One boot per ITS runs one job (the nested guest: kvmits.lab.linux_guest) whose sections
the tests below read:

- a pattern written to /dev/vda from every CPU and read back with the page cache dropped
  (checksums, and the host file holding the same bytes);
- /proc/interrupts before and after: the virtio vectors are ITS MSIs, spread over the CPUs, and
  their counts rise with the I/O;
- /dev/hwrng gives bytes; then the rng's vector is moved to CPU 1 through smp_affinity (Linux
  sends MOVI) and, once an interrupt still in flight has landed, its next interrupts arrive there.
"""

from __future__ import annotations

import hashlib
import io
import re

import pytest

from kvmits.lab.linux_guest import GuestReport, LinuxGuest
from kvmits.machine import Machine, MachineConfig
from kvmits.machine.machine import FIRST_PCI_SLOT, Disk

CPUS = 4
MEM = 512 << 20
DISK_BYTES = 8 << 20
CHUNK = 64 << 10                  # each CPU writes and reads its own 64 KiB at offset cpu * CHUNK
BOOT_TIMEOUT = 900
RNG_DEVID = (FIRST_PCI_SLOT + 1) << 3
CMDLINE = "console=ttyAMA0 quiet panic=-1"

JOB = f"""
section() {{ echo "== $1"; }}
section interrupts-before; cat /proc/interrupts
for c in $(seq 0 {CPUS - 1}); do
  dd if=/dev/urandom of=/tmp/p$c bs={CHUNK} count=1 2>/dev/null
  taskset -c $c dd if=/tmp/p$c of=/dev/vda bs={CHUNK} seek=$c count=1 conv=fsync 2>/dev/null || echo "write $c failed"
done
sync; echo 3 > /proc/sys/vm/drop_caches
for c in $(seq 0 {CPUS - 1}); do
  taskset -c $c dd if=/dev/vda of=/tmp/r$c bs={CHUNK} skip=$c count=1 2>/dev/null || echo "read $c failed"
done
section sums
for c in $(seq 0 {CPUS - 1}); do echo "$c $(md5sum < /tmp/p$c | cut -d' ' -f1) $(md5sum < /tmp/r$c | cut -d' ' -f1)"; done
section hwrng
dd if=/dev/hwrng bs=16 count=4 2>/dev/null | wc -c
cat /sys/class/misc/hw_random/rng_current
section interrupts-after; cat /proc/interrupts
irq=$(grep -m1 'virtio[0-9]*-input' /proc/interrupts | cut -d: -f1 | tr -d ' ')
# the kernel's own hwrng thread reads the device at any time: quality 0 stops it (6.x), so that
# only the reads below make the vector fire
echo 0 > /sys/module/rng_core/parameters/current_quality 2>/dev/null
section affinity; echo "irq=$irq"
echo 2 > /proc/irq/$irq/smp_affinity && echo "moved to CPU 1"
# a read the hwrng thread still had in flight may complete where the vector was: let it land
# before the count the reads below are measured from
sleep 1
section interrupts-premove; cat /proc/interrupts
section moved-reads; dd if=/dev/hwrng bs=16 count=8 2>/dev/null | wc -c
section interrupts-moved; cat /proc/interrupts
section end
"""


def sections(output: str) -> dict[str, str]:
    out, name = {}, None
    for line in output.splitlines():
        m = re.match(r"== (\S+)$", line.strip())
        if m:
            name = m.group(1)
            out[name] = ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def interrupts(text: str) -> dict[str, tuple[list[int], str]]:
    """/proc/interrupts: action name -> (count per CPU, the chip/hwirq/type description)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or not parts[0].endswith(":") or not parts[0][:-1].isdigit():
            continue
        counts = [int(p) for p in parts[1:1 + CPUS]]
        rest = parts[1 + CPUS:]
        if len(counts) == CPUS and rest:
            out[rest[-1]] = (counts, " ".join(rest[:-1]))
    return out


@pytest.fixture(scope="module", params=["kernel", "user"])
def booted(arm64_kvm, request, tmp_path_factory):
    guest = LinuxGuest.find()
    if guest is None:
        pytest.skip(LinuxGuest.why_missing())
    disk = tmp_path_factory.mktemp("linux") / "disk.img"
    disk.write_bytes(bytes(DISK_BYTES))
    console = io.BytesIO()
    m = Machine(MachineConfig(cpus=CPUS, mem_size=MEM, its=request.param, disks=(Disk(str(disk)),), rng=True),
                console=console)
    try:
        m.load(guest.image, cmdline=CMDLINE, initrd=guest.initrd(JOB))
        result = m.run(BOOT_TIMEOUT)
        report = GuestReport.parse(console.getvalue()).check(result)
        stats = {"its": m.its.stats(), "model": getattr(m.its, "model", None) and m.its.model.stats(),
                 "commands": list(getattr(m.its, "command_log", ())),
                 "notifications": {name: s.notifier.notifications for name, s in m.pci_devices.items()},
                 "bad_address": {name: s.function.msix.sink.bad_address for name, s in m.pci_devices.items()}}
    finally:
        m.close()
    yield request.param, sections(report.output), disk.read_bytes(), stats


def test_the_disk_round_trips_from_every_cpu_and_the_host_file_holds_it(booted):
    its, out, disk, stats = booted
    sums = [line.split() for line in out["sums"].splitlines() if line.strip()]
    assert len(sums) == CPUS, out
    for cpu, written, read in sums:
        assert written == read, f"CPU {cpu}: read back {read}, wrote {written}"
        c = int(cpu)
        assert hashlib.md5(disk[c * CHUNK:(c + 1) * CHUNK]).hexdigest() == written
    assert stats["notifications"]["virtio-blk0"] > 0          # through the ioeventfds


def test_virtio_vectors_are_its_msis_spread_over_the_cpus_and_count_the_io(booted):
    its, out, disk, stats = booted
    before, after = interrupts(out["interrupts-before"]), interrupts(out["interrupts-after"])
    queues = {name: v for name, v in after.items() if re.fullmatch(r"virtio\d+-req\.\d+", name)}
    assert len(queues) == CPUS, after                           # one vector per queue, queue per CPU
    for name, (_, chip) in queues.items():
        assert "ITS" in chip and "MSI" in chip, (name, chip)
    rose_on = set()
    for name, (counts, _) in queues.items():
        old = before.get(name, ([0] * CPUS, ""))[0]
        rose_on |= {cpu for cpu in range(CPUS) if counts[cpu] > old[cpu]}
    assert len(rose_on) >= 2, (before, after)                  # I/O from every CPU, completions spread
    assert not any(stats["bad_address"].values())


def test_hwrng_gives_bytes(booted):
    its, out, disk, stats = booted
    lines = out["hwrng"].split()
    assert lines[0] == "64" and lines[1].startswith("virtio_rng"), out["hwrng"]


def test_smp_affinity_moves_the_rng_vector_with_movi(booted):
    its, out, disk, stats = booted
    assert "moved to CPU 1" in out["affinity"], out["affinity"]
    assert out["moved-reads"].split() == ["128"], out["moved-reads"]          # 8 x 16 bytes read after the move
    after, moved = interrupts(out["interrupts-premove"]), interrupts(out["interrupts-moved"])
    name = next(n for n in moved if re.fullmatch(r"virtio\d+-input", n))
    delta = [m - a for m, a in zip(moved[name][0], after[name][0])]
    assert delta[1] > 0 and sum(delta) == delta[1], (name, delta)
    if its == "user":
        movis = [r for r in stats["commands"] if r.name == "MOVI" and r.dwords[0] >> 32 == RNG_DEVID]
        assert movis, [r.name for r in stats["commands"]]


def test_the_userspace_its_translates_no_msi_in_python(booted):
    its, out, disk, stats = booted
    if its != "user":
        pytest.skip("the kernel's ITS translates in the kernel: nothing to count")
    assert stats["model"]["msis"] == 0, stats["model"]
    assert stats["its"]["slow_path_msis"] == 0 and stats["its"]["msis_injected"] == 0, stats["its"]


@pytest.mark.parametrize("its", ["kernel", "user"])
def test_kvmits_run_with_disk_and_rng(arm64_kvm, tmp_path, its):
    """The same devices from the command line: `kvmits run --disk FILE,ro --rng`."""
    import subprocess
    import sys
    from pathlib import Path

    guest = LinuxGuest.find()
    if guest is None:
        pytest.skip(LinuxGuest.why_missing())
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"kvmits!\n" + bytes(DISK_BYTES - 8))
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(guest.initrd("cat /sys/block/vda/size /sys/block/vda/ro; head -c 8 /dev/vda;"
                                    " head -c 8 /dev/hwrng | wc -c; (echo x > /dev/vda) 2>/dev/null || echo refused"))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "kvmits", "run", str(guest.image), "--cpus", "2", "--mem", "256M",
                          "--its", its, "--initrd", str(initrd), "--append", CMDLINE, "--disk", f"{disk},ro", "--rng",
                          "--timeout", str(BOOT_TIMEOUT)],
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT + 60, cwd=root, check=False)
    report = GuestReport.parse(out.stdout)
    assert out.returncode == 0, (out.stderr.decode()[-2000:], report.problem())
    lines = report.check().output.split()
    assert lines[:5] == [str(DISK_BYTES // 512), "1", "kvmits!", "8", "refused"], report.output
    assert disk.read_bytes()[:8] == b"kvmits!\n"                       # read-only: untouched
