"""`kvmits run IMAGE`: boot a guest with its console on stdout; exit with the guest's status.

Exit status: 0 the guest powered off (PSCI SYSTEM_OFF); 3 it asked for a reset (SYSTEM_RESET:
the VM ends, it is not rebooted); 4 a crash or other system event; 1 the VMM failed (a vCPU
thread's error, printed); 2 a bad command line or image; 124 --timeout expired; 130 Ctrl-C;
143 SIGTERM.
Standard input is fed to the UART's receive side as it arrives (a terminal stays in its
normal line mode).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import signal
import sys
import threading
import time

log = logging.getLogger("kvmits.run")

EXIT_VMM_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143       # 128 + SIGTERM, as a shell reports a process SIGTERM killed
DEFAULT_APPEND = "console=ttyAMA0 earlycon"
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256M', '1G', '65536', '512KiB' -> bytes (binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


def _disk(text: str):
    from kvmits.machine.machine import Disk

    try:
        disk = Disk.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not os.path.isfile(disk.path):
        raise argparse.ArgumentTypeError(f"disk {disk.path!r} is not a file")
    if not os.access(disk.path, os.R_OK if disk.readonly else os.R_OK | os.W_OK):
        raise argparse.ArgumentTypeError(f"disk {disk.path!r} is not {'readable' if disk.readonly else 'readable and writable'}")
    return disk


def _regex(text: str):
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({exc})") from None


def _trace_classes() -> list[str]:
    from kvmits.machine.trace import CLASSES

    return list(CLASSES)


def _trace_spec(text: str):
    from kvmits.machine.trace import parse_spec

    try:
        return parse_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers) -> None:
    from kvmits.machine import ITS_KINDS

    p = subparsers.add_parser(
        "run", help="boot an arm64 guest image, console on stdout",
        description="Boot IMAGE (a raw arm64 program or a Linux Image) in an arm64 KVM VM with the in-kernel "
                    "vGICv3 (and ITS). The PL011 console goes to stdout, stdin to the UART. Exit status: 0 guest "
                    "powered off, 3 guest reset, 4 guest crash, 1 VMM error, 2 bad arguments, 124 timeout, "
                    "130 interrupted, 143 terminated (SIGTERM).")
    p.add_argument("image", nargs="?", help="guest image file (not with --restore)")
    p.add_argument("--restore", metavar="FILE",
                   help="resume the VM saved in snapshot FILE (the control socket's `save`) instead of booting "
                        "an image; --its picks the ITS to resume it on (default: the saved one)")
    p.add_argument("--cpus", type=_positive_int, help="number of vCPUs (default 1; with --restore: must match)")
    p.add_argument("--mem", type=parse_size, metavar="SIZE",
                   help="RAM size, a multiple of 2M (default 128M; with --restore: must match)")
    p.add_argument("--append", default=DEFAULT_APPEND, metavar="ARGS",
                   help=f"kernel command line, in the device tree's /chosen/bootargs (default {DEFAULT_APPEND!r})")
    p.add_argument("--initrd", metavar="FILE", help="initrd / initramfs to load after the device tree")
    p.add_argument("--its", choices=(*ITS_KINDS, "none"),
                   help="the ITS: in-kernel (the default for an image), another kind kvmits.machine offers, or none")
    p.add_argument("--kind", choices=("auto", "raw", "linux"), default="auto",
                   help="image kind; auto: a Linux Image if its header says so (gzip allowed), else raw")
    p.add_argument("--agent", action="store_true", help="map the guest agent's mailbox at 0x0A000000")
    p.add_argument("--disk", action="append", default=[], metavar="FILE[,ro]", type=_disk,
                   help="a virtio-blk disk on the PCIe bus backed by FILE (read-only with ,ro), one queue per "
                        "vCPU; repeat for more disks (needs an ITS)")
    p.add_argument("--rng", action="store_true", help="a virtio-rng device on the PCIe bus (needs an ITS)")
    p.add_argument("--control", metavar="PATH",
                   help="serve a control socket at PATH while the VM runs: `kvmits its dump|translate "
                        "--connect PATH` reads its ITS; its `save` request writes a snapshot")
    p.add_argument("--migrate-on", metavar="REGEX", type=_regex,
                   help="migrate the running VM (into a new one, in this process) each time a console line "
                        "matches REGEX; the control socket's `migrate` does the same on request")
    p.add_argument("--migrate-its", choices=ITS_KINDS, metavar="KIND",
                   help="the ITS kind the VM migrates to (default: the same; ITS test suites: the other)")
    p.add_argument("--then-send", metavar="TEXT",
                   help="after a --migrate-on migration, feed TEXT to the UART (the key a migration test waits "
                        "for; \\n and \\r are newline and return)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop the guest after this long (exit status 124)")
    p.add_argument("--trace", metavar="SPEC", type=_trace_spec,
                   help="trace the ITS traffic kvmits sees as JSON lines (docs/trace.md): SPEC is comma-separated "
                        "classes or globs, '-' removes (e.g. 'all', 'its_*,irq,mark', 'all,-its_mmio'); classes: "
                        + ", ".join(_trace_classes()))
    p.add_argument("--trace-file", metavar="FILE", default="kvmits-trace.jsonl",
                   help="where --trace writes (default %(default)s; '-' for standard error)")
    p.set_defaults(func=run)


def _feed_stdin(session) -> None:
    from kvmits.errors import KvmitsError

    fd = sys.stdin.fileno()
    while True:
        try:
            data = os.read(fd, 4096)
            if not data:
                return
            session.machine.uart.feed(data)
        except (OSError, KvmitsError):      # stdin closed, or the VM is gone (its IRQ line with it)
            return


class _Terminated(Exception):
    """SIGTERM arrived: stop the guest and clean up (control socket, VM) like Ctrl-C does."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def run(args) -> int:
    from kvmits.machine import install_kick_handler

    install_kick_handler()
    if threading.current_thread() is not threading.main_thread():
        return _run(args)                       # (signal handlers belong to the main thread)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    except _Terminated:
        # before the guest ran (building the VM, loading the image): nothing to stop, and the
        # machine was closed on the way out
        print("\nkvmits run: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _config(args):
    """The MachineConfig of a boot (not --restore); ValueError saying what is wrong."""
    from kvmits.machine import MachineConfig

    its = None if args.its == "none" else args.its
    return MachineConfig(cpus=args.cpus or 1, mem_size=args.mem or 128 << 20,
                         its="kernel" if args.its is None else its,
                         agent=args.agent, disks=tuple(args.disk), rng=args.rng)


def _file_problem(args) -> str | None:
    """The first file of the command line (image, --initrd, --restore) that is missing or
    unreadable, in words: named before anything else is checked."""
    for what, path in (("image", args.image), ("--initrd", args.initrd), ("--restore", args.restore)):
        if path is None:
            continue
        if not os.path.exists(path):
            return f"{path}: no such file (the {what})"
        if not os.path.isfile(path):
            return f"{path}: not a file (the {what})"
        if not os.access(path, os.R_OK):
            return f"{path}: not readable (the {what})"
    return None


def _image_problem(args) -> str | None:
    """What is wrong with the image for this machine (kind, size, the initrd's room), checked on
    the host as the loader will check it, or None."""
    from kvmits.machine.loader import ImageError, place_image, plan_layout
    from kvmits.machine.memmap import MemoryMap

    try:
        with open(args.image, "rb") as f:
            data = f.read()
        ram = MemoryMap(args.cpus or 1, args.mem or 128 << 20).ram
        image = place_image(ram, data, args.kind)
        plan_layout(ram, image, None if args.initrd is None else os.path.getsize(args.initrd))
    except (ImageError, ValueError, OSError) as exc:
        return f"{args.image}: {exc}"
    return None


def _run_in_testbed(args) -> int:
    """`kvmits run` on a host without arm64 KVM: the same command inside the arm64 testbed, with
    the image, initrd, disks and snapshot carried in (tools/testbed run --file) and their paths
    mapped; the guest's console and exit status come back as they are."""
    from kvmits.cli.testbed import guest_path, testbed_files_command

    if args.control or (args.trace is not None and args.trace_file != "-"):
        what = "--control (a socket in the testbed)" if args.control else "--trace-file (a file in the testbed)"
        print(f"kvmits run: {what} cannot reach this host: in the testbed use --trace-file - (standard error), "
              f"or run on an arm64 KVM host", file=sys.stderr)
        return EXIT_USAGE
    files = [p for p in (args.image, args.initrd, args.restore) if p is not None] + [d.path for d in args.disk]
    mapped = {os.path.abspath(p): guest_path(p) for p in files}

    def remap(token: str) -> str:
        name, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
        path, ro = (value[:-3], ",ro") if value.endswith(",ro") else (value, "")
        new = mapped.get(os.path.abspath(path)) if path else None
        if new is None or not os.path.exists(path):
            return token
        return f"{name}{eq}{new}{ro}"

    inner = ["python3", "-m", "kvmits", *[remap(t) for t in args.argv]]
    cmd = testbed_files_command(inner, files)
    if cmd is None:
        print(f"kvmits run needs arm64 KVM and this host is {platform.machine()}, and this installation has no "
              f"arm64 testbed (tools/testbed of a kvmits source tree)", file=sys.stderr)
        return EXIT_VMM_ERROR
    if any(not d.readonly for d in args.disk):
        print("kvmits run: the testbed gets a copy of each disk: the guest's writes stay there", file=sys.stderr)
    print(f"kvmits run: this is {platform.machine()}, running in the arm64 testbed ...", file=sys.stderr, flush=True)
    import subprocess

    return subprocess.call(cmd)


def _run(args) -> int:
    problem = _file_problem(args)
    if problem:
        print(f"kvmits run: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from kvmits.cli.testbed import in_testbed, needs_testbed

    if needs_testbed() and not in_testbed():
        # what the testbed would refuse, refused here: the machine's configuration, the image
        if args.image is not None and args.restore is None:
            try:
                _config(args)
            except ValueError as exc:
                print(f"kvmits run: {exc}", file=sys.stderr)
                return EXIT_USAGE
            problem = _image_problem(args)
            if problem:
                print(f"kvmits run: {problem}", file=sys.stderr)
                return EXIT_USAGE
        return _run_in_testbed(args)
    try:
        tracer = _open_tracer(args)
    except OSError as exc:
        print(f"kvmits run: --trace-file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run_traced(args, tracer)
    finally:
        _close_tracer(tracer, args)


def _run_traced(args, tracer) -> int:
    from kvmits.errors import KvmitsError
    from kvmits.machine import Machine
    from kvmits.machine.loader import ImageError

    its = None if args.its == "none" else args.its
    if args.restore is not None:
        return _restore(args, its, tracer)
    if args.image is None:
        print("kvmits run: an IMAGE to boot, or --restore FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = _config(args)
    except ValueError as exc:
        print(f"kvmits run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    box: list = []                              # the _Session, once there is one
    console = _console(args, box, tracer)
    try:
        machine = Machine(config, console=console)
    except KvmitsError as exc:
        print(f"kvmits run: cannot create the VM: {exc} (see `kvmits probe`)", file=sys.stderr)
        return EXIT_VMM_ERROR
    except OSError as exc:                     # a disk that cannot be opened
        print(f"kvmits run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with machine:
        try:
            machine.load(args.image, kind=args.kind, cmdline=args.append, initrd=args.initrd)
        except (ImageError, OSError) as exc:
            print(f"kvmits run: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return _serve(machine, args, console, box, tracer)


def _restore(args, its, tracer=None) -> int:
    """`--restore FILE`: the saved VM in a new one, ITS kind `its` (None: the saved kind)."""
    from kvmits.errors import KvmitsError
    from kvmits.machine import Machine

    if args.image is not None or args.initrd or args.disk or args.rng or args.agent:
        print("kvmits run: --restore takes the machine from the file: no IMAGE, --initrd, --disk, --rng or --agent",
              file=sys.stderr)
        return EXIT_USAGE
    if args.its == "none":
        print("kvmits run: --restore keeps the saved machine's ITS, of this kind or the other: not --its none",
              file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isfile(args.restore):
        print(f"kvmits run: {args.restore}: no such file", file=sys.stderr)
        return EXIT_USAGE
    expect = {k: v for k, v in (("cpus", args.cpus), ("mem_size", args.mem)) if v is not None}
    box: list = []
    console = _console(args, box, tracer)
    try:
        machine = Machine.restore(args.restore, its=its, console=console, expect=expect)
    except KvmitsError as exc:
        print(f"kvmits run: cannot restore {args.restore}: {exc}", file=sys.stderr)
        return EXIT_VMM_ERROR
    with machine:
        return _serve(machine, args, console, box, tracer)


class _Session:
    """The machine `kvmits run` serves, which a live migration replaces (control socket
    `migrate`, --migrate-on): the control handlers, stdin and the wait follow `machine`."""

    def __init__(self, machine, args, tracer=None):
        self.machine = machine
        self.args = args
        #: --trace's Tracer (kvmits.machine.trace), attached to each machine in turn
        self.tracer = tracer
        #: held for a whole migration: the wait sees the old machine end, then the new one
        self.lock = threading.Lock()
        self.reports: list[dict] = []

    def migrate(self, its: str | None = None) -> dict:
        from kvmits.machine.migration import migrate

        with self.lock:
            new, report = migrate(self.machine, its)
            if self.tracer is not None:
                self.tracer.detach()
                self.tracer.attach(new)
            self.machine = new
            self.reports.append(report)
        log.info("migrated to the %s ITS: %.3f s downtime", report["its"][1], report["downtime"])
        return report


class _ConsoleWatch:
    """The console stream, watched line by line for --migrate-on's REGEX: a match migrates the
    VM (on a thread of its own: the line arrives on a vCPU thread, which the migration pauses)
    and then feeds --then-send's text to the new machine's UART."""

    def __init__(self, out, session_box: list, pattern, its, then_send: str | None):
        self.out = out
        self.box = session_box
        self.pattern = pattern
        self.its = its
        self.then_send = None if then_send is None else then_send.replace("\\n", "\n").replace("\\r", "\r").encode()
        self._line = bytearray()

    def write(self, data: bytes) -> int:
        self.out.write(data)
        for byte in data:
            if byte == 0x0A:
                line = self._line.decode(errors="replace").rstrip("\r")
                self._line.clear()
                if self.pattern.search(line):
                    threading.Thread(target=self._migrate, name="migrate", daemon=True).start()
            elif len(self._line) < 4096:
                self._line.append(byte)
        return len(data)

    def flush(self) -> None:
        self.out.flush()

    def _migrate(self) -> None:
        session = self.box[0]
        try:
            report = session.migrate(self.its)
        except Exception as exc:    # noqa: BLE001 - the thread's end: the run reports it, exit 1
            # The run was asked to migrate, and a guest waiting for it (--then-send) would wait
            # out --timeout: end the VM (the source, resumed) with the failure instead.
            exc.add_note(f"(in the --migrate-on migration to the {self.its or 'same'} ITS)")
            session.machine.fail(exc)
            return
        print(f"\nkvmits run: migrated ({report['its'][0]} -> {report['its'][1]} ITS), "
              f"downtime {report['downtime'] * 1000:.1f} ms", file=sys.stderr)
        if self.then_send:
            session.machine.uart.feed(self.then_send)


def _console(args, box: list, tracer=None):
    out = sys.stdout.buffer
    if tracer is not None:
        out = tracer.console(out)
    if args.migrate_on is None:
        return out
    return _ConsoleWatch(out, box, args.migrate_on, args.migrate_its, args.then_send)


def _open_tracer(args):
    """--trace's Tracer on --trace-file, or None; OSError if the file cannot be written."""
    if args.trace is None:
        return None
    from kvmits.machine.trace import Tracer

    out = sys.stderr if args.trace_file == "-" else open(args.trace_file, "w", encoding="utf-8")
    return Tracer(out, args.trace)


def _close_tracer(tracer, args) -> None:
    if tracer is None:
        return
    tracer.close()
    if tracer.out is not sys.stderr:
        tracer.out.close()
        print(f"kvmits run: {tracer.events} trace events in {args.trace_file} (kvmits trace summarize "
              f"{args.trace_file})", file=sys.stderr)


def _serve(machine, args, console, box: list, tracer=None) -> int:
    """stdin to the UART, the control socket, and the run until the guest ends; the machine
    may be replaced by migrations meanwhile (the last one is closed here)."""
    from kvmits.errors import KvmitsError

    session = _Session(machine, args, tracer)
    if tracer is not None:
        tracer.attach(machine)
    box.append(session)
    if sys.stdin is not None and not sys.stdin.closed:
        threading.Thread(target=_feed_stdin, args=(session,), name="stdin", daemon=True).start()
    control = None
    if args.control:
        from kvmits.machine import ITS_KINDS
        from kvmits.machine.control import ControlServer, machine_handlers

        def migrate(req: dict) -> dict:
            its = req.get("its")
            if its is not None and its not in ITS_KINDS:
                raise ValueError(f"its must be one of {ITS_KINDS}, not {its!r}")
            return session.migrate(its)

        try:
            control = ControlServer(args.control, dict(machine_handlers(lambda: session.machine), migrate=migrate))
        except KvmitsError as exc:
            print(f"kvmits run: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return _run_until_exit(session, args, console)
    finally:
        if control is not None:
            control.close()
        session.machine.close()


def _wait(session, timeout: float | None):
    """The end of the guest, through migrations: the wait moves on to each new machine."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        machine = session.machine
        result = machine.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with session.lock:                  # a migration in progress ends the old machine
            if session.machine is machine:
                return result


def _run_until_exit(session, args, console) -> int:
    """Start the vCPUs and wait for the guest to end; the exit status (see the module's docstring)."""
    try:
        # inside the try: a SIGTERM or Ctrl-C while the vCPU threads start (the control socket
        # already answers) stops the guest like one during the run
        session.machine.start()
        result = _wait(session, args.timeout)
    except TimeoutError:
        session.machine.stop()
        console.flush()
        print(f"\nkvmits run: stopped the guest after {args.timeout} s", file=sys.stderr)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        session.machine.stop()
        console.flush()
        print("\nkvmits run: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        session.machine.stop()
        console.flush()
        print("\nkvmits run: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:     # a vCPU thread's failure: report it, exit 1
        console.flush()
        log.debug("vCPU failure", exc_info=True)
        notes = "".join(f" {n}" for n in getattr(exc, "__notes__", ()))
        print(f"\nkvmits run: the VM failed: {type(exc).__name__}: {exc}{notes}", file=sys.stderr)
        return EXIT_VMM_ERROR
    console.flush()
    if result.reason != "poweroff":
        print(f"\nkvmits run: guest {result.reason} (vCPU {result.cpu}): exit status {result.status}",
              file=sys.stderr)
    return result.status
