"""`kvmits run --trace` on a Linux guest with the userspace ITS (issue 14): the guest's own ITS
driver maps its virtio devices (MAPD, MAPTI for the disk's DeviceID), and an smp_affinity write
makes it send a MOVI for the rng's vector, all in the trace; `kvmits trace summarize` reads it.
The same run with the kernel's ITS traces what kvmits sees around it (routes, interrupts) and no
ITS command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmits.lab.linux_guest import GuestReport, LinuxGuest
from kvmits.machine.machine import FIRST_PCI_SLOT
from kvmits.machine.trace import read_trace, summarize

ROOT = Path(__file__).resolve().parents[2]
CMDLINE = "console=ttyAMA0 quiet panic=-1"
TIMEOUT = 600
BLK_DEVID = FIRST_PCI_SLOT << 3
RNG_DEVID = (FIRST_PCI_SLOT + 1) << 3
JOB = """
dd if=/dev/vda of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null
irq=$(grep -m1 'virtio[0-9]*-input' /proc/interrupts | cut -d: -f1 | tr -d ' ')
echo 0 > /sys/module/rng_core/parameters/current_quality 2>/dev/null
vq=$(grep -m1 'virtio[0-9]*-req[.]0' /proc/interrupts | cut -d: -f1 | tr -d ' ')
(echo 1 > /proc/irq/$vq/smp_affinity) 2>/dev/null && echo "managed: moved" || echo "managed: refused"
echo "KVMITS-PHASE affinity"
# to another CPU than the one it is on (a move to where it is sends no MOVI)
cur=$(cat /proc/irq/$irq/effective_affinity_list)
new=$(( (cur + 1) % 4 ))
echo $new > /proc/irq/$irq/smp_affinity_list && echo "moved from CPU $cur to CPU $new"
dd if=/dev/hwrng bs=16 count=4 2>/dev/null | wc -c
"""


def traced_boot(tmp_path: Path, its: str) -> tuple[dict, list[dict], GuestReport]:
    guest = LinuxGuest.find()
    if guest is None:
        pytest.skip(LinuxGuest.why_missing())
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(guest.initrd(JOB))
    trace = tmp_path / "trace.jsonl"
    out = subprocess.run([sys.executable, "-m", "kvmits", "run", str(guest.image), "--cpus", "4", "--mem", "512M",
                          "--its", its, "--initrd", str(initrd), "--append", CMDLINE, "--disk", str(disk), "--rng",
                          "--trace", "all", "--trace-file", str(trace), "--timeout", str(TIMEOUT)],
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT + 60, cwd=ROOT, check=False)
    report = GuestReport.parse(out.stdout)
    assert out.returncode == 0, (out.stderr.decode()[-2000:], report.problem())
    report.check()
    assert "moved from CPU" in report.output, report.output
    # a per-queue vector of the disk has a managed affinity: Linux refuses to move it (EIO), the
    # reason kvmits bench part 5 churns a shared vector (Disk.vectors = 2) instead
    assert "managed: refused" in report.output, report.output
    with trace.open() as f:
        header, events = read_trace(f)
    return header, events, report


def test_the_trace_shows_linux_mapping_the_disk_and_a_movi_after_an_affinity_change(arm64_kvm, tmp_path):
    header, events, report = traced_boot(tmp_path, "user")
    assert header["its"] == "user"
    commands = [e for e in events if e["class"] == "its_cmd"]
    mapd = [e for e in commands if e["cmd"] == "MAPD" and e["fields"]["devid"] == BLK_DEVID and e["fields"]["valid"]]
    mapti = [e for e in commands if e["cmd"] == "MAPTI" and e["fields"]["devid"] == BLK_DEVID]
    assert mapd, sorted({(e["cmd"], e["fields"].get("devid")) for e in commands})
    assert len(mapti) >= 4, mapti                          # one vector per queue (4 vCPUs), and config
    assert all(e["vcpu"] is not None for e in commands)    # the guest's CWRITER writes, on vCPU threads
    marks = [e for e in events if e["class"] == "mark" and e["text"] == "KVMITS-PHASE affinity"]
    assert len(marks) == 1
    after = [e for e in commands if e["t"] > marks[0]["t"]]
    movis = [e for e in after if e["cmd"] == "MOVI" and e["fields"]["devid"] == RNG_DEVID]
    assert movis, [(e["cmd"], e["fields"]) for e in after]
    # every class of the userspace ITS is there, with its fields
    classes = {e["class"] for e in events}
    assert {"its_mmio", "its_cmd", "its_stop", "its_routes", "msi_routes", "irq", "mark"} <= classes, classes
    cwriter = [e for e in events if e["class"] == "its_mmio" and e["reg"] == "GITS_CWRITER" and e["rw"] == "w"]
    # Linux's ITS driver zeroes GITS_CWRITER with a 64-bit write at probe and publishes commands
    # with 32-bit ones (its_post_commands: writel_relaxed)
    assert cwriter and {e["size"] for e in cwriter} == {4, 8}, cwriter
    stops = [e for e in events if e["class"] == "its_stop"]
    assert stops and all(e["held"] >= e["wait"] >= 0 and e["vcpus"] == 4 for e in stops)
    # the disk's completions went through irqfd routes: no translation in Python at all
    assert not [e for e in events if e["class"] == "its_translate"]
    summary = summarize(header, events)
    phases = {p["name"]: p for p in summary["phases"]}
    assert {"boot", "job", "affinity", "shutdown"} <= set(phases), list(phases)
    assert phases["boot"]["commands"]["MAPD"] >= 2 and phases["affinity"]["commands"].get("MOVI", 0) >= 1
    # the CLI reads the same file
    out = subprocess.run([sys.executable, "-m", "kvmits", "trace", "summarize", "--json", str(tmp_path / "trace.jsonl")],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout)["phases"] == json.loads(json.dumps(summary["phases"]))


def test_with_the_kernels_its_the_trace_has_routes_and_interrupts_and_no_its_command(arm64_kvm, tmp_path):
    header, events, report = traced_boot(tmp_path, "kernel")
    assert header["its"] == "kernel" and "not traced" in header["note"]
    classes = {e["class"] for e in events}
    assert {"msi_routes", "irq", "mark"} <= classes, classes
    assert not classes & {"its_mmio", "its_cmd", "its_stop", "its_translate", "its_routes"}
    irqs = [e for e in events if e["class"] == "irq"]
    assert {e["devid"] for e in irqs} >= {BLK_DEVID, RNG_DEVID} and all(e["sent"] for e in irqs)
