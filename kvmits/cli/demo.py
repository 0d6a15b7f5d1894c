"""`kvmits demo`: the same guest ITS workload on the kernel's ITS and on kvmits' userspace ITS,
a check that the guest saw the same LPIs in both, and their costs side by side.

The workload, run by the same guest (the agent, through kvmits.lab.its_lab.ItsLab):
set up LPIs and the ITS, map one device with one event per LPI spread over the vCPUs, then
deliver every event by KVM_SIGNAL_MSI (`Machine.signal_msi`), by irqfd, move every event to the
next vCPU with MOVI and deliver them again. The guest reports each LPI and the vCPU that took it.

On an arm64 KVM host it runs here. Elsewhere it runs itself inside the arm64 testbed
(tools/testbed of a kvmits source tree), and says that its times are emulated.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from kvmits.cli.testbed import add_kernel_option, in_testbed, kernel_refused, needs_testbed, run_in_testbed
from kvmits.its.registers import GITS_TYPER, LPI_BASE

DEVID = 0x42
FIRST_GSI = 64


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3 if samples else float("nan")


def run_mode(mode: str, cpus: int, events: int) -> dict:
    """The workload on one ITS; returns what the guest saw and what it cost."""
    from kvmits.machine.agent import SysReg
    from kvmits.lab.its_lab import ItsLab

    out: dict = {"mode": mode, "seen": [], "times": {}}
    t0 = time.monotonic()
    with ItsLab(cpus=cpus, its=mode) as lab:
        out["times"]["boot_s"] = time.monotonic() - t0
        t = time.monotonic()
        lab.setup()
        out["times"]["setup_s"] = time.monotonic() - t
        lab.its.mapd(DEVID, max(1, (events - 1).bit_length()))
        batch = []
        for ev in range(events):
            t = time.monotonic()
            lab.its.mapti(DEVID, ev, LPI_BASE + ev, ev % cpus)
            batch.append(time.monotonic() - t)
        out["times"]["command_ms"] = _median_ms(batch)

        def deliver(label, send):
            lat = []
            for ev in range(events):
                intid = LPI_BASE + ev
                t = time.monotonic()
                send(ev)
                got = lab.agent.wait_irqs(1, 30.0, intid=intid)
                lat.append(got[0][2] - t)
                out["seen"].extend((label, cpu, i) for cpu, i, _ in got)
            out["times"][f"{label}_ms"] = _median_ms(lat)

        deliver("signal_msi", lambda ev: lab.msi(DEVID, ev))
        efds = lab.routes({(DEVID, ev): FIRST_GSI + ev for ev in range(events)})
        deliver("irqfd", lambda ev: efds[(DEVID, ev)].write(1))
        for ev in range(events):
            lab.its.movi(DEVID, ev, (ev + 1) % cpus)
        deliver("after_movi", lambda ev: lab.msi(DEVID, ev))

        # a guest read of a GITS register, timed by the guest with its virtual counter
        freq = lab.agent.read_sysreg(0, SysReg.CNTFRQ_EL0)
        reads = 200
        ticks = lab.agent.timed_read(0, lab.its.base + GITS_TYPER, 8, reads)
        out["times"]["gits_read_us"] = ticks / freq / reads * 1e6
        stops = lab.machine.its.stats().get("vcpu_stops")
        if stops is not None:
            out["stops"] = stops
        lab.agent.take_irqs()
    return out


def compare_runs(kernel: dict, user: dict) -> bool:
    return sorted(kernel["seen"]) == sorted(user["seen"])


ROWS = (
    ("boot_s", "boot + agent online", "s", 2),
    ("setup_s", "LPI + ITS set-up by the guest", "s", 2),
    ("command_ms", "one MAPTI batch (CWRITER write -> done)", "ms", 2),
    ("signal_msi_ms", "MSI by signal_msi -> guest", "ms", 2),
    ("irqfd_ms", "MSI by irqfd -> guest", "ms", 2),
    ("after_movi_ms", "MSI after MOVI -> guest", "ms", 2),
    ("gits_read_us", "guest read of GITS_TYPER", "us", 1),
)


def format_table(kernel: dict, user: dict, emulated: bool) -> str:
    lines = [f"{'':44s} {'kernel ITS':>14s} {'userspace ITS':>14s}"]
    n_k, n_u = len(kernel["seen"]), len(user["seen"])
    same = compare_runs(kernel, user)
    lines.append(f"{'LPIs the guest took (path, vCPU, LPI)':44s} {n_k:>14d} {n_u:>14d}"
                 f"   {'identical' if same else 'DIFFERENT'}")
    for key, label, unit, digits in ROWS:
        k, u = kernel["times"][key], user["times"][key]
        ratio = f"   x{u / k:.1f}" if k else ""
        lines.append(f"{label + ' (' + unit + ')':44s} {k:>14.{digits}f} {u:>14.{digits}f}{ratio}")
    if "stops" in user:
        lines.append(f"{'vCPU stops by the userspace ITS':44s} {'-':>14s} {user['stops']:>14d}")
    if emulated:
        lines.append("Times are EMULATED (arm64 KVM nested in qemu TCG, the testbed): compare the two "
                     "columns, not with hardware.")
    return "\n".join(lines)


#: `kvmits demo --linux`'s rows: (figure name, path, label, unit, digits, kernel ITS seen by kvmits)
LINUX_ROWS = (
    ("linux_boot", "userspace", "Linux boot to /init", "s", 2, True),
    ("linux_boot", "devices_probed", "... to the virtio devices probed", "s", 2, True),
    ("blk_iops", "qd1", "4 KiB random reads, QD1", "IOPS", 0, True),
    ("blk_iops", "qd16", "4 KiB random reads, QD16", "IOPS", 0, True),
    ("blk_latency", "qd1_p50", "read latency QD1, median", "us", 0, True),
    ("irq_rate", "qd16", "disk interrupts at QD16", "/s", 0, True),
    ("affinity_moves", "churn", "vector moves by smp_affinity (MOVI)", "/s", 1, True),
    ("its_accesses", "boot", "GITS accesses at boot", "", 0, False),
    ("its_commands", "boot", "ITS commands at boot", "", 0, False),
    ("vcpu_stops", "boot", "vCPU stops at boot", "", 0, False),
    ("its_commands", "io", "ITS commands per I/O", "", 3, False),
    ("python_translations", "io", "Python translations per I/O", "", 3, False),
)


def _linux_value(figures: list[dict], name: str, its: str, path: str):
    for f in figures:
        if (f["name"], f["its"], f["path"]) == (name, its, path):
            return f
    return None


def format_linux_table(figures: list[dict], emulated: bool) -> str:
    """`kvmits demo --linux`: part 5's figures (kvmits.bench.linux) as one short table."""
    lines = [f"{'':44s} {'kernel ITS':>14s} {'userspace ITS':>14s}"]
    for name, path, label, unit, digits, kernel_seen in LINUX_ROWS:
        k, u = _linux_value(figures, name, "kernel", path), _linux_value(figures, name, "user", path)
        if k is None or u is None:
            continue
        kv, uv = k["stats"]["median"], u["stats"]["median"]
        kt = f"{kv:>14,.{digits}f}" if kernel_seen else f"{'in KVM':>14s}"
        ratio = f"   x{uv / kv:.2f}" if kernel_seen and kv else ""
        extra = f" (held {u['held_s'] * 1000:.0f} ms)" if name == "vcpu_stops" else ""
        lines.append(f"{label + (' (' + unit + ')' if unit else ''):44s} {kt} {uv:>14,.{digits}f}{ratio}{extra}")
    lines.append("'in KVM': the kernel's ITS does this in the kernel, where kvmits cannot count it.")
    if emulated:
        lines.append("Times are EMULATED (arm64 KVM nested in qemu TCG, the testbed): compare the two "
                     "columns, not with hardware.")
    return "\n".join(lines)


def cmd_linux(args) -> int:
    """`kvmits demo --linux`: part 5 of kvmits bench, short (one timed and one traced boot per ITS)."""
    from kvmits.bench import linux

    def progress(msg: str) -> None:
        print(f"kvmits demo: {msg} ...", file=sys.stderr, flush=True)

    figures, skipped = linux.run_linux(linux.Sizes(quick=True, repeat=1), progress)
    if skipped:
        for s in skipped:
            print(f"kvmits demo --linux: {s['reason']}", file=sys.stderr)
        return 2
    if args.json:
        json.dump({"emulated": in_testbed(), "figures": figures}, sys.stdout, indent=2)
        print()
    else:
        print(format_linux_table(figures, in_testbed()))
    return 0


def cmd_demo(args) -> int:
    refused = kernel_refused("demo", args)
    if refused is not None:
        return refused
    if needs_testbed():
        argv = ["demo", "--linux"] if args.linux else ["demo", "--cpus", str(args.cpus), "--events", str(args.events)]
        return run_in_testbed("demo", argv + (["--json"] if args.json else []), args.kernel)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("kvmits demo: /dev/kvm is missing or not accessible: run `kvmits probe`", file=sys.stderr)
        return 2
    if args.linux:
        return cmd_linux(args)
    runs = {}
    for mode in ("kernel", "user"):
        print(f"kvmits demo: {args.cpus} vCPUs, {args.events} events, {mode} ITS ...", file=sys.stderr, flush=True)
        runs[mode] = run_mode(mode, args.cpus, args.events)
    same = compare_runs(runs["kernel"], runs["user"])
    if args.json:
        json.dump({"emulated": in_testbed(), "same_lpis": same,
                   "kernel": runs["kernel"]["times"], "user": runs["user"]["times"]}, sys.stdout, indent=2)
        print()
    else:
        print(format_table(runs["kernel"], runs["user"], in_testbed()))
    return 0 if same else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="the same guest ITS workload on the kernel's and the userspace ITS, compared",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", type=int, default=4, help="vCPUs (default: %(default)s)")
    p.add_argument("--events", type=int, default=16, help="events/LPIs of the demo device (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--linux", action="store_true",
                   help="a Linux guest instead of the agent: boot, virtio-blk I/O, affinity churn and the ITS "
                        "traffic with each ITS (kvmits bench part 5, short; a few minutes)")
    add_kernel_option(p)
    p.set_defaults(func=cmd_demo)
