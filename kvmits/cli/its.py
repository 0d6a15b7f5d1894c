"""`kvmits its dump` and `kvmits its translate`: what an ITS has mapped, and where an MSI would
go, for either ITS: the kernel's (read with KVM_DEV_ARM_ITS_SAVE_TABLES and decoded) or kvmits'
userspace model (read directly).

Two ways to name the ITS:
  --connect PATH   a running VM: `kvmits run --control PATH ...` serves its ITS there.
  --its MODE       boot a VM with the guest agent, let the guest set up its ITS and run a command
                   program (--program), then answer; MODE `both` (the default) runs the same
                   program on the kernel's and the userspace ITS and says whether they agree.
                   On a non-arm64 host this runs inside the arm64 testbed.
"""

from __future__ import annotations

import json
import os
import sys

from kvmits.cli.testbed import add_kernel_option, in_testbed, kernel_refused, needs_testbed, run_in_testbed

MODES = ("kernel", "user")
#: what each translation miss means (IHI 0069 5.2: the first look-up that fails)
REASONS = {
    "translated": "",
    "its-disabled": "GITS_CTLR.Enabled is 0: the ITS translates nothing",
    "device-unmapped": "no MAPD for this DeviceID",
    "event-out-of-range": "EventID past the device's ITT size (MAPD Size)",
    "no-ite": "the ITT has no entry for this EventID",
    "collection-unmapped": "the event's collection has no target (MAPC)",
}
ORPHAN_NOTE = ("an ITE whose collection MAPC V=0 unmapped is saved by the kernel as an invalid entry, "
               "so its saved tables say no-ite where the model says collection-unmapped; both drop the MSI")


def _int(text: str) -> int:
    import argparse

    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r} (0x.. for hex)") from None
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"out of 0..0xffffffff: {text}")
    return value


# -- where the answers come from -------------------------------------------------------------
def load_program(args):
    """The batches of --program (demo, seed:N, or a file), or ProgramError / OSError."""
    from kvmits.lab import differential
    from kvmits.lab.its_program import ProgramError, demo_program, parse_program

    spec = args.program
    if spec == "demo":
        return demo_program(args.cpus, args.events)
    if spec.startswith("seed:"):
        try:
            seed = int(spec[5:], 0)
        except ValueError:
            raise ProgramError(f"--program seed:N needs an integer N, not {spec[5:]!r}") from None
        return differential.generate_program(seed, differential.LENGTH, args.cpus)
    if args.program_text is None:           # a file: read once, passed on as text (testbed)
        with open(spec, encoding="utf-8") as f:
            args.program_text = f.read()
    return parse_program(args.program_text, spec)


def collect(args, batches, query):
    """Boot a lab per mode of --its, set the guest's ITS up, run the program `batches`, and
    return {mode: query(lab)}."""
    from kvmits.lab.its_lab import ItsLab
    from kvmits.lab.its_program import ProgramRunner

    out = {}
    for mode in MODES if args.its == "both" else (args.its,):
        print(f"kvmits its: {mode} ITS, {args.cpus} vCPUs, program {args.program} "
              f"({sum(map(len, batches))} commands) ...", file=sys.stderr, flush=True)
        with ItsLab(cpus=args.cpus, its=mode) as lab:
            lab.setup()
            ProgramRunner(lab).run(batches)
            out[mode] = query(lab)
    return out


# -- dump ------------------------------------------------------------------------------------
def format_snapshot(snap) -> str:
    """A snapshot as text: collections -> vCPUs, then each device's events -> LPIs."""
    name = {"kernel": "kernel ITS", "user": "userspace ITS"}.get(snap.its, snap.its)
    lines = [f"{name}: {'enabled' if snap.enabled else 'DISABLED (GITS_CTLR.Enabled = 0)'}; read from {snap.source}"]
    colls = snap.dump["collections"]
    lines.append("collections -> vCPU: " + ("  ".join(f"{i}->{t}" for i, t in colls.items()) or "none"))
    if snap.untargeted:
        lines.append("collections without a target: " + " ".join(map(str, snap.untargeted)))
    devices = snap.dump["devices"]
    lines.append(f"devices: {len(devices)}")
    for devid, dev in devices.items():
        events = dev["events"]
        lines.append(f"  DeviceID {devid:#x}: ITT {dev['itt_addr']:#x}, {dev['size_bits']} EventID bits, "
                     f"{len(events)} mapped event(s)")
        for ev, ite in events.items():
            target = colls.get(ite["icid"])
            where = f"vCPU {target}" if target is not None else "no target"
            lines.append(f"    EventID {ev:<6d} -> LPI {ite['intid']:<6d} collection {ite['icid']:<4d} {where}")
    if snap.orphans is None:
        lines.append("orphaned ITEs: not visible in the kernel's saved tables")
    else:
        lines.append("orphaned ITEs (collection unmapped): "
                     + (" ".join(f"{d:#x}/{e}" for d, e in snap.orphans) or "none"))
    return "\n".join(lines)


def snapshot_differences(kernel, user) -> list[str]:
    """What differs between two snapshots' mappings (empty: the same)."""
    from kvmits.lab.differential import compare

    diffs = []
    if kernel.enabled != user.enabled:
        diffs.append(f"GITS_CTLR.Enabled: kernel {int(kernel.enabled)}, user {int(user.enabled)}")
    diffs += compare(dict(kernel.dump, untargeted=list(kernel.untargeted)),
                     dict(user.dump, untargeted=list(user.untargeted)))
    return diffs


def cmd_dump(args, batches) -> int:
    from kvmits.its.query import ItsSnapshot

    if args.connect:
        from kvmits.machine.control import request

        snaps = {}
        snap = ItsSnapshot.from_json(request(args.connect, "its-dump"))
        snaps[snap.its] = snap
    else:
        snaps = collect(args, batches, lambda lab: lab.snapshot())
    diffs = snapshot_differences(snaps["kernel"], snaps["user"]) if len(snaps) == 2 else None
    if args.json:
        out = {"emulated": in_testbed(), "its": {m: s.to_json() for m, s in snaps.items()}}
        if not args.connect:
            out["program"] = args.program
        if diffs is not None:
            out.update(same=not diffs, differences=diffs)
        print(json.dumps(out, indent=2))
    else:
        print("\n\n".join(format_snapshot(s) for s in snaps.values()))
        if diffs is not None:
            print("\nkernel ITS and userspace ITS: " + ("the same mappings" if not diffs else
                                                        "DIFFERENT:\n  " + "\n  ".join(diffs)))
    return 1 if diffs else 0


# -- translate -------------------------------------------------------------------------------
def format_translation(its: str, devid: int, eventid: int, t: dict) -> str:
    head = f"{'kernel ITS' if its == 'kernel' else 'userspace ITS':14s} DeviceID {devid:#x} EventID {eventid}"
    if t["reason"] == "translated":
        line = f"{head} -> LPI {t['intid']} on vCPU {t['vcpu']} (collection {t['icid']})"
        if t.get("shared_with"):
            others = ", ".join(f"{d:#x}/{e}" for d, e in t["shared_with"])
            line += (f"\n{'':14s} note: LPI {t['intid']} is also mapped by DeviceID/EventID {others}; KVM keeps "
                     "one target per LPI, so the MSI goes where that LPI was last mapped or moved")
        if t.get("lpi_vcpu") is not None and t["lpi_vcpu"] != t["vcpu"]:
            line += (f"\n{'':14s} note: KVM has LPI {t['intid']} on vCPU {t['lpi_vcpu']} (MOVALL, or another "
                     f"ITE of it): the MSI is delivered there, not to vCPU {t['vcpu']}")
    else:
        line = f"{head} -> no LPI: {t['reason']} ({REASONS.get(t['reason'], '?')})"
    if "delivered" in t:
        d = t["delivered"]
        taken = ", ".join(f"LPI {i} on vCPU {c}" for c, i in d["taken"]) or "nothing"
        line += f"\n{'':14s} sent: signal_msi returned {d['accepted']}; the guest took {taken}"
    return line


#: how long `--send` waits for the guest to report the LPI (the testbed is slow)
SEND_WAIT = 2.0


def send_and_watch(lab, devid: int, eventid: int) -> dict:
    """Send the MSI (Machine.signal_msi: KVM_SIGNAL_MSI, through the model's slow path for the
    userspace ITS) and report what the guest took: {"accepted": 1 or 0 (did not translate),
    "taken": [[vCPU, LPI], ...]}."""
    import time

    from kvmits.machine.agent import AgentTimeout

    time.sleep(0.2)                          # LPIs the program's INT commands raised
    lab.agent.take_irqs()
    accepted = lab.msi(devid, eventid)
    try:
        got = lab.agent.wait_irqs(1, SEND_WAIT)
    except AgentTimeout as exc:
        got = exc.irqs
    time.sleep(0.3)                          # anything else it raised
    got += lab.agent.take_irqs()
    return {"accepted": accepted, "taken": [[cpu, intid] for cpu, intid, _ in got]}


def translations_agree(results: dict) -> tuple[bool, str | None]:
    """Do the modes' answers deliver the same (LPI, vCPU, collection), or drop the MSI alike?
    The second value explains a drop for different reasons (an orphaned ITE)."""
    outcomes = {(t["intid"], t["icid"], t["vcpu"]) for t in results.values()}
    reasons = {t["reason"] for t in results.values()}
    if len(outcomes) > 1:
        return False, None
    if reasons == {"no-ite", "collection-unmapped"}:
        return True, ORPHAN_NOTE
    return len(reasons) == 1, None


def cmd_translate(args, batches) -> int:
    if args.connect:
        from kvmits.machine.control import request

        t = request(args.connect, "its-translate", devid=args.devid, eventid=args.eventid)
        results = {t.pop("its"): t}
    else:
        def query(lab):
            t = lab.machine.its.translation_report(args.devid, args.eventid)
            del t["its"]
            if args.send:
                t["delivered"] = send_and_watch(lab, args.devid, args.eventid)
            return t

        results = collect(args, batches, query)
    agree, note = translations_agree(results) if len(results) == 2 else (None, None)
    if args.json:
        out = {"emulated": in_testbed(), "devid": args.devid, "eventid": args.eventid, "its": results}
        if agree is not None:
            out.update(agree=agree, note=note)
        print(json.dumps(out, indent=2))
    else:
        for mode, t in results.items():
            print(format_translation(mode, args.devid, args.eventid, t))
        if agree is not None:
            print("the two ITSes " + ("agree" if agree else "DISAGREE") + (f" ({note})" if note else ""))
    return 1 if agree is False else 0


# -- the command line ------------------------------------------------------------------------
def _testbed_argv(args) -> list[str]:
    """The same command for the testbed; a program file goes as the text load_program read (the
    testbed sees only the source tree)."""
    argv = ["its", args.action]
    if args.action == "translate":
        argv += [str(args.devid), str(args.eventid)]
    argv += ["--its", args.its, "--cpus", str(args.cpus), "--events", str(args.events), "--program", args.program]
    if getattr(args, "send", False):
        argv.append("--send")
    if args.program_text is not None:       # read by load_program
        argv += ["--program-text", args.program_text]
    return argv + (["--json"] if args.json else [])


def cmd_its(args) -> int:
    from kvmits.errors import KvmitsError
    from kvmits.lab.its_program import ProgramError

    if getattr(args, "send", False) and args.connect:
        print("kvmits its: --send needs a VM this command boots (it watches the guest agent), not --connect",
              file=sys.stderr)
        return 2
    batches = None                              # --connect: the running VM's own guest
    try:
        if not args.connect:
            batches = load_program(args)            # a bad program fails here, before any VM
            refused = kernel_refused("its", args)
            if refused is not None:
                return refused
            if needs_testbed():
                return run_in_testbed("its", _testbed_argv(args), args.kernel)
            if not os.access("/dev/kvm", os.R_OK | os.W_OK):
                print("kvmits its: /dev/kvm is missing or not accessible: run `kvmits probe`", file=sys.stderr)
                return 2
        return cmd_dump(args, batches) if args.action == "dump" else cmd_translate(args, batches)
    except KvmitsError as exc:          # a failing ioctl (named with its errno), or the control socket
        print(f"kvmits its: {exc}", file=sys.stderr)
        return 1
    except (ProgramError, OSError) as exc:
        print(f"kvmits its: {exc}", file=sys.stderr)
        return 2


def register(sub) -> None:
    import argparse

    from kvmits.cli.run import _positive_int

    p = sub.add_parser("its", help="an ITS's mappings (dump) and translation queries (translate), either ITS",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_ in (("dump", "devices, events -> LPIs, collections -> vCPUs"),
                        ("translate", "the (LPI, vCPU) an MSI (DEVID, EVENTID) would reach")):
        a = actions.add_parser(name, help=help_, description=help_)
        if name == "translate":
            a.add_argument("devid", type=_int, help="DeviceID (0x.. for hex)")
            a.add_argument("eventid", type=_int, help="EventID")
        a.add_argument("--connect", metavar="PATH", help="ask a running VM (`kvmits run --control PATH`)")
        a.add_argument("--its", choices=(*MODES, "both"), default="both",
                       help="without --connect: which ITS to boot (default: %(default)s)")
        a.add_argument("--program", default="demo", metavar="demo|seed:N|FILE",
                       help="without --connect: the guest's ITS commands: `demo` (kvmits demo's mappings), "
                            "`seed:N` (the differential check's program N) or a command file "
                            "(kvmits.lab.its_program) (default: %(default)s)")
        a.add_argument("--program-text", help=argparse.SUPPRESS)
        a.add_argument("--cpus", type=_positive_int, default=4, help="vCPUs (default: %(default)s)")
        a.add_argument("--events", type=_positive_int, default=16, help="events of the demo program (default: %(default)s)")
        if name == "translate":
            a.add_argument("--send", action="store_true",
                           help="without --connect: then send the MSI and report which vCPU the guest took the LPI on")
        a.add_argument("--json", action="store_true", help="machine-readable output")
        add_kernel_option(a)
        a.set_defaults(func=cmd_its)
