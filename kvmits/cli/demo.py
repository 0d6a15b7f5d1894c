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


def cmd_demo(args) -> int:
    refused = kernel_refused("demo", args)
    if refused is not None:
        return refused
    if needs_testbed():
        return run_in_testbed("demo", ["demo", "--cpus", str(args.cpus), "--events", str(args.events)]
                              + (["--json"] if args.json else []), args.kernel)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("kvmits demo: /dev/kvm is missing or not accessible: run `kvmits probe`", file=sys.stderr)
        return 2
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
    add_kernel_option(p)
    p.set_defaults(func=cmd_demo)
