"""tools/testbed's command line.

    tools/testbed build [--refresh] [--force]       make or refresh the cached image
    tools/testbed run [OPTIONS] -- CMD [ARGS...]    run CMD in the guest, in a copy of the tree
    tools/testbed probe [OPTIONS]                   quick check of KVM inside the guest
    tools/testbed clean                             remove the cache

Exit status: CMD's own, or one of errors.EXIT_* for the testbed's own failures.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import build, job, kernels, linux_guest, qemu
from .console import ConsoleFilter, new_token
from .errors import (EXIT_GUEST_KERNEL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_TESTBED, EXIT_TIMEOUT,
                     TestbedError)
from .log import clock, info, since
from .paths import SOURCE_ROOT, Layout, cache_root

PROBE_COMMAND = ["sh", "tools/testbed_lib/guest/probe.sh"]
LOG_KEEP = 20
# A run's scratch directory older than this belongs to no live run (time limits are shorter).
RUN_DIR_MAX_AGE = 2 * 24 * 3600

EPILOG = """exit status: the command's own (0-255) when the guest reported it; otherwise
123 when the guest kernel faulted (an oops, "Unable to handle kernel", BUG, a panic, or a
WARNING in KVM: the run ends a few seconds after it, the trace and the running test or
command are reported), 124 when the time limit stopped qemu, 125 when the testbed itself
failed (host setup, image build, make -C guests, qemu, or a guest that stopped without
reporting), 2 for a bad command line, 130 on Ctrl-C, 143 on SIGTERM. The testbed's
messages go to stderr, prefixed 'testbed:'; stdout is the guest's console.

kernel (--kernel K): a Debian suite (bookworm, the default; bookworm-backports, trixie,
trixie-backports, sid: the linux-image-arm64 there), a Debian kernel version or prefix
(6.12, 6.12.57, 6.1: the newest linux-image-arm64 of those suites starting with it), or a
path to your own arm64 Image (with --modules DIR, a lib/modules/<release> tree) or to a
linux-image .deb (make bindeb-pkg; its modules are used). Only the kernel changes: the
root file system stays bookworm's. The guest sees the choice in KVMITS_TESTBED_KERNEL.

environment: KVMITS_CACHE (cache directory, default ${XDG_CACHE_HOME:-~/.cache}/kvmits;
the testbed uses its testbed/ subdirectory), KVMITS_TESTBED_SMP, KVMITS_TESTBED_MEM,
KVMITS_TESTBED_TIMEOUT, KVMITS_TESTBED_KERNEL (defaults for --smp, --mem, --timeout,
--kernel)."""


def _env_default(name: str, default: int, environ) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise SystemExit(f"testbed: {name}={value!r} is not a whole number") from None
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


def _env_assignment(text: str) -> str:
    try:
        job.parse_env([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser(environ=None) -> argparse.ArgumentParser:
    """The parser; --kernel and --modules stay strings here, parse_args classifies them."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="tools/testbed",
        description="arm64 KVM for kvmits on an x86_64 host: Debian's arm64 kernel under "
                    "qemu-system-aarch64 (TCG, EL2 emulated), built from Debian packages and cached.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    refresh = argparse.ArgumentParser(add_help=False)
    refresh.add_argument("--refresh", action="store_true",
                         help="update the arm64 package lists and wheels now (normally once a day)")

    kernel = argparse.ArgumentParser(add_help=False)
    k = kernel.add_argument_group("kernel")
    k.add_argument("--kernel", metavar="K", default=environ.get("KVMITS_TESTBED_KERNEL") or None,
                   help="the guest kernel: a Debian suite (default bookworm), a Debian kernel "
                        "version prefix such as 6.12, or a path to an arm64 Image or a "
                        "linux-image .deb (default $KVMITS_TESTBED_KERNEL, else bookworm)")
    k.add_argument("--modules", metavar="DIR",
                   help="with --kernel PATH: a lib/modules/<release> tree (or a directory "
                        "holding one) to put at /lib/modules/<release> in the guest")

    p = sub.add_parser("build", parents=[refresh, kernel],
                       help="build or refresh the cached image (and --kernel's kernel) only")
    p.add_argument("--force", action="store_true", help="rebuild even if the image is current")

    boot = argparse.ArgumentParser(add_help=False)
    g = boot.add_argument_group("guest machine")
    g.add_argument("--smp", type=_positive, default=_env_default("KVMITS_TESTBED_SMP", 2, environ),
                   help="vCPUs of the guest (default %(default)s)")
    g.add_argument("--mem", type=_positive, default=_env_default("KVMITS_TESTBED_MEM", 2048, environ),
                   metavar="MIB", help="guest memory in MiB (default %(default)s)")
    g.add_argument("--timeout", type=_positive,
                   default=_env_default("KVMITS_TESTBED_TIMEOUT", 1200, environ), metavar="SECONDS",
                   help="time limit from boot to power-off (default %(default)s); exit 124 when hit")
    g.add_argument("--nvhe", action="store_true",
                   help=f"boot the guest kernel with {qemu.NVHE_APPEND} (KVM in nVHE mode)")
    g.add_argument("--cpu", default=qemu.CPU, help="qemu CPU model (default %(default)s)")
    g.add_argument("--append", default="", metavar="ARGS", help="more guest kernel command line")
    j = boot.add_argument_group("job")
    j.add_argument("--no-make", action="store_true",
                   help="do not run 'make -C guests' before packing the tree")
    j.add_argument("-q", "--quiet", action="store_true",
                   help="show only the command's output, not the boot messages and markers")

    p = sub.add_parser("run", parents=[refresh, kernel, boot], help="run a command in the guest",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="tools/testbed run [OPTIONS] -- CMD [ARGS...]",
                       description="Runs CMD in the arm64 guest, in a copy of the source tree "
                                   "(kvmits/ include/ tests/ tools/ benchmarks/ pyproject.toml, "
                                   "tracked and untracked-not-ignored, plus guests/build/), with "
                                   "PYTHONPATH set to it, and exits with CMD's exit status.")
    p.add_argument("-e", "--env", action="append", default=[], type=_env_assignment,
                   metavar="NAME=VALUE", help="set an environment variable for CMD (repeatable)")
    p.add_argument("--file", action="append", default=[], dest="files", metavar="PATH",
                   help=f"copy a host file or directory (recursively) into the guest at "
                        f"{job.FILES_DIR} + its absolute, normalised host path, e.g. "
                        f"/home/u/t/test_a.py -> {job.FILES_DIR}/home/u/t/test_a.py (a relative "
                        f"PATH is taken against the current directory); repeatable. Modes are "
                        f"kept; a symlink given as PATH is followed, symlinks inside a directory "
                        f"are skipped with a warning. At most {job.FILES_MAX_BYTES >> 20} MiB in "
                        f"all (the job is held in the guest's RAM). A copy: writable in the "
                        f"guest, nothing comes back to the host. A PATH that is missing, "
                        f"unreadable or neither a file nor a directory is exit 2")

    sub.add_parser("probe", parents=[refresh, kernel, boot],
                   epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                   help="boot and check KVM in the guest (uname, /dev/kvm, python, cffi, kvmits probe)")
    sub.add_parser("clean", help="remove the testbed cache")
    return parser


def parse_args(argv: list[str], environ=None) -> argparse.Namespace:
    """Parses argv; for `run`, everything after the first '--' is the command."""
    parser = build_parser(environ)
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    else:
        command = None
    args = parser.parse_args(argv)
    if args.subcommand == "run":
        if not command:
            parser.error("run: give the command after '--', e.g. "
                         "tools/testbed run -- python3 -m pytest tests/arm64")
        args.command = command
        try:
            # checked now, before anything is built or booted
            args.carried = job.collect_files(args.files)
        except TestbedError as exc:
            parser.error(str(exc))
    elif command is not None:
        parser.error(f"{args.subcommand} takes no command after '--'")
    else:
        args.command = PROBE_COMMAND if args.subcommand == "probe" else None
    if args.subcommand != "clean":
        from_env = args.kernel is not None and "--kernel" not in argv and not any(
            a.startswith("--kernel=") for a in argv)
        try:
            args.kernel_spec = (kernels.parse_spec(args.kernel, args.modules) if args.kernel
                                else kernels.DEFAULT if not args.modules
                                else kernels.parse_spec(kernels.DEFAULT_SUITE, args.modules))
        except ValueError as exc:
            parser.error(f"{exc}" + (" (from KVMITS_TESTBED_KERNEL)" if from_env else ""))
    return args


def boot_config(args: argparse.Namespace) -> qemu.BootConfig:
    return qemu.BootConfig(smp=args.smp, mem=args.mem, cpu=args.cpu, nvhe=args.nvhe,
                           append=args.append, timeout=args.timeout, quiet=args.quiet)


def new_log(layout: Layout, subcommand: str) -> Path:
    layout.logs.mkdir(parents=True, exist_ok=True)
    logs = sorted(layout.logs.glob("*.log"))
    for old in logs[:max(0, len(logs) - (LOG_KEEP - 1))]:
        old.unlink(missing_ok=True)
    return layout.logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{subcommand}.log"


def prune_runs(layout: Layout, now: float, max_age: float = RUN_DIR_MAX_AGE) -> None:
    """Removes scratch directories left by runs that were killed outright (SIGKILL)."""
    if not layout.runs.is_dir():
        return
    for d in layout.runs.iterdir():
        try:
            old = now - d.stat().st_mtime > max_age
        except FileNotFoundError:  # another run just removed its own
            continue
        if old:
            shutil.rmtree(d, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link keeps this run's kernel even if another process rebuilds the image.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def cmd_build(args: argparse.Namespace, layout: Layout) -> int:
    build.ensure_host()
    with build.locked(layout):
        stamp = build.ensure_image(layout, refresh=args.refresh, force=args.force)
        kernel = kernels.ensure_kernel(layout, args.kernel_spec, stamp, refresh=args.refresh)
    info(f"image in {layout.image}: kernel {stamp['kernel']}, {len(stamp['guest_packages'])} "
         f"packages, wheels {' '.join(stamp['wheels']) or 'none'}")
    if kernel.key != "default":
        info(f"kernel for --kernel {args.kernel}: {kernel.description}, in {kernel.vmlinuz.parent}")
    info(_guest_line(kernel))
    return 0


def _guest_line(kernel: kernels.Kernel) -> str:
    guest = kernel.guest
    if guest is None or guest.directory is None:
        why = guest.note if guest is not None else "not made"
        return f"no nested Linux guest for this kernel ({why}); the guest gets /{linux_guest.MISSING_NOTE} saying so"
    return f"nested Linux guest: {guest.note}, in {guest.directory}"


def cmd_clean(args: argparse.Namespace, layout: Layout) -> int:
    if layout.root.exists():
        with build.locked(layout):
            for child in layout.root.iterdir():
                if child.name == "lock":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        info(f"removed {layout.root}")
    return 0


def cmd_run(args: argparse.Namespace, layout: Layout) -> int:
    build.ensure_host()
    if not args.no_make:
        job.make_guests(SOURCE_ROOT)
    files = job.select_files(SOURCE_ROOT)
    carried = getattr(args, "carried", [])  # run --file, checked by parse_args
    user_env = job.parse_env(getattr(args, "env", []))
    token = new_token()
    prune_runs(layout, time.time())
    layout.runs.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=layout.runs))
    try:
        with build.locked(layout):
            stamp = build.ensure_image(layout, refresh=args.refresh)
            kernel = kernels.ensure_kernel(layout, args.kernel_spec, stamp, refresh=args.refresh)
            # The guest's tests can say which kernel they ran on; -e can still override it.
            script = job.run_script(args.command, {"KVMITS_TESTBED_KERNEL": kernel.description,
                                                   **user_env})
            t = clock()
            _link_or_copy(kernel.vmlinuz, rundir / "vmlinuz")
            with open(rundir / "initrd", "wb") as f:
                # base, then the kernel's modules (if any), the nested Linux guest (or the
                # note why there is none), then the job: the kernel unpacks the concatenated
                # archives in order
                for part in (layout.base_cpio, kernel.modules_cpio):
                    if part is not None:
                        with open(part, "rb") as src:
                            shutil.copyfileobj(src, f, 1 << 20)
                if kernel.guest is not None:
                    linux_guest.write_testbed_archive(f, kernel.guest)
                job.write_job(f, SOURCE_ROOT, files, script, carried)
        if kernel.guest is not None and kernel.guest.directory is None:
            info(_guest_line(kernel))
        info(f"job: {len(files)} files of {SOURCE_ROOT}{_carried_note(carried)} "
             f"({since(t):.1f}s to pack)")
        cfg = boot_config(args)
        cmd = qemu.qemu_command(cfg, rundir / "vmlinuz", rundir / "initrd", token)
        log_path = new_log(layout, args.subcommand)
        info(f"booting {kernel.description}: {args.smp} vCPUs, {args.mem} MiB, time limit "
             f"{args.timeout}s; console log {log_path}")
        with open(log_path, "w") as log:
            log.write(f"# tools/testbed {args.subcommand}: {' '.join(args.command)}\n"
                      f"# kernel: {kernel.description}\n"
                      f"# {' '.join(cmd)}\n")
            log.flush()
            console = ConsoleFilter(token, quiet=args.quiet)
            result = qemu.boot(cmd, cfg, console, sys.stdout, log)
            verdict = verdict_of(result, args.timeout, log_path, kernel.description, args.command)
            log.write(f"# {verdict[1]}\n")
        failed = failed_line(result)
        if failed:
            # pytest's own short-summary form, on stdout with the rest of pytest's output
            print(failed, flush=True)
        info(verdict[1])
        return verdict[0]
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _carried_note(carried: list[job.CarriedFile]) -> str:
    if not carried:
        return ""
    n = sum(1 for c in carried if not c.is_dir)
    return f", {n} --file files ({job.payload_bytes(carried) / (1 << 20):.1f} MiB) under {job.FILES_DIR}"


def failed_line(result: qemu.BootResult) -> str | None:
    """'FAILED <nodeid> - guest kernel fault: ...' when a fault happened in a pytest test."""
    fault = result.fault
    if fault is None or not fault.running or fault.status is not None:
        return None
    return f"FAILED {fault.running} - guest kernel fault: {fault.summary}"


def _fault_context(fault, command: list[str] | None) -> str:
    if not fault.started:
        return "while the guest booted, before the command started"
    if fault.status is not None:
        return f"after the command had exited with status {fault.status}"
    cmd = shlex.join(command) if command else "the command"
    if fault.running:
        return f"in test {fault.running} (of {cmd})"
    return f"while running {cmd}"


def verdict_of(result: qemu.BootResult, timeout: int, log_path: Path,
               kernel: str | None = None, command: list[str] | None = None) -> tuple[int, str]:
    """The exit status of a run, and the line that explains it (naming the kernel)."""
    timing = f"kernel {kernel}; " if kernel else ""
    timing += (f"booted in {result.booted_after:.1f}s, " if result.booted_after is not None else "")
    timing += f"{result.seconds:.1f}s in the guest"
    if result.fault is not None:
        fault = result.fault
        ended = (f"run ended {result.fault_after:.1f}s after it" if result.fault_after is not None
                 else "run ended")
        trace = "\n    ".join(fault.lines)
        return EXIT_GUEST_KERNEL, (
            f"guest kernel fault ({fault.kind}) {_fault_context(fault, command)}: {fault.summary}; "
            f"{ended} (exit {EXIT_GUEST_KERNEL}; {timing}). The "
            f"{'trace' if fault.complete else 'trace so far'}:\n    {trace}\nConsole log: {log_path}")
    if result.timed_out:
        where = "while the command ran" if result.booted_after is not None else "before the guest finished booting"
        return EXIT_TIMEOUT, (f"time limit of {timeout}s reached {where}; qemu stopped "
                              f"(exit {EXIT_TIMEOUT}; {timing}). Console log: {log_path}")
    if result.status is None:
        last = "\n    ".join(result.tail)
        if result.qemu_status not in (0, None) and result.booted_after is None:
            what = f"qemu failed with exit status {result.qemu_status}"
        else:
            what = (f"the guest stopped without reporting an exit status (qemu exit "
                    f"{result.qemu_status}; {timing})")
        panic = f" The guest kernel panicked: {result.panic}." if result.panic else ""
        return EXIT_TESTBED, (f"{what}; exit {EXIT_TESTBED}.{panic} "
                              f"Last console lines:\n    {last}\nConsole log: {log_path}")
    status = min(result.status, 255)
    return status, f"command exited with status {status} ({timing})"


class Terminated(Exception):
    """SIGTERM (a CI runner giving up on us): unwinds like Ctrl-C, so qemu is stopped and the
    run's scratch directory removed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    layout = Layout(cache_root())
    handler = {"build": cmd_build, "run": cmd_run, "probe": cmd_run, "clean": cmd_clean}[args.subcommand]
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return handler(args, layout)
    except TestbedError as exc:
        info(f"error: {exc}")
        return exc.status
    except KeyboardInterrupt:
        info("interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        info("terminated")
        return EXIT_TERMINATED
