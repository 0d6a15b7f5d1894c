"""Where a sub-command that needs arm64 KVM runs: here on an arm64 host, else inside the arm64
testbed of the kvmits source tree (tools/testbed), which runs the same command there."""

from __future__ import annotations

import os
import platform
import posixpath
import subprocess
import sys
from pathlib import Path


def in_testbed() -> bool:
    """Are we inside the testbed (arm64 KVM nested in qemu TCG: times are emulated)?"""
    return os.environ.get("KVMITS_TESTBED") == "1"


def needs_testbed() -> bool:
    """Must arm64 work be sent to the testbed from here?"""
    return platform.machine() != "aarch64"


#: the source tree this kvmits runs from (if it is one): the testbed's commands run there
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def add_kernel_option(parser) -> None:
    """`--kernel K` of the commands that run in the testbed on a non-arm64 host."""
    parser.add_argument("--kernel", metavar="K", default=None,
                        help="on a non-arm64 host, the testbed's guest kernel: a Debian suite, version "
                             "or a path to an arm64 Image (tools/testbed --kernel; default: "
                             "$KVMITS_TESTBED_KERNEL, else bookworm's 6.1). On an arm64 host: refused, "
                             "the command runs on this host's kernel")


def kernel_refused(name: str, args) -> int | None:
    """2 (and why, on stderr) if `--kernel` was given where the command runs on this host's kernel."""
    if getattr(args, "kernel", None) and not needs_testbed():
        print(f"kvmits {name}: --kernel chooses the testbed's kernel; on this {platform.machine()} host the "
              f"command runs on the host's own kernel ({os.uname().release})", file=sys.stderr)
        return 2
    return None


def testbed_command(argv: list[str], kernel: str | None = None, timeout: int | None = None) -> list[str] | None:
    """The host command (run in SOURCE_ROOT) that runs `python3 -m kvmits ARGV` in the testbed,
    on `kernel` (tools/testbed --kernel), within `timeout` seconds of boot (tools/testbed
    --timeout; default: its own), or None if this installation has no tools/testbed."""
    tool = SOURCE_ROOT / "tools" / "testbed"
    if not tool.is_file():
        return None
    chosen = ["--kernel", kernel] if kernel else []
    if timeout is not None:
        chosen += ["--timeout", str(timeout)]
    return [sys.executable, str(tool), "run", "-q", *chosen, "--", "python3", "-m", "kvmits", *argv]


#: where `tools/testbed run --file PATH` puts PATH in the guest: FILES_DIR + its absolute path
FILES_DIR = "/job/files"


def guest_path(host_path: str, cwd: str | None = None) -> str:
    """Where `tools/testbed run --file host_path` puts host_path in the guest: FILES_DIR followed
    by the absolute, normalised host path, e.g. /home/u/t/test_a.py -> /job/files/home/u/t/test_a.py.

    A relative host_path is taken against cwd (default: this process's working directory,
    the only thing read besides the arguments). Normalising is textual, as posixpath.normpath
    does it: '.', '..' and repeated '/' go, symlinks are not resolved (so 'link/..' is the
    directory holding link). Host and guest (kvmits computing the same name) must agree, so
    this stays tiny and uses only os and posixpath. tools/testbed_lib/job.py packs by it."""
    path = posixpath.join(os.getcwd() if cwd is None else cwd, os.fspath(host_path))
    if not posixpath.isabs(path):
        raise ValueError(f"cwd must be absolute, got {cwd!r}")
    rest = posixpath.normpath(path).lstrip("/")
    return f"{FILES_DIR}/{rest}" if rest else FILES_DIR


def testbed_files_command(argv: list[str], files: list[str], *, cwd: str | None = None,
                          kernel: str | None = None) -> list[str] | None:
    """The host command that runs ARGV (any command) in the testbed with `files` carried in
    (tools/testbed run --file) and, with `cwd`, in that guest directory (made if missing); None
    if this installation has no tools/testbed."""
    tool = SOURCE_ROOT / "tools" / "testbed"
    if not tool.is_file():
        return None
    chosen = ["--kernel", kernel] if kernel else []
    carry = [a for f in files for a in ("--file", f)]
    inner = list(argv) if cwd is None else ["sh", "-c", 'mkdir -p "$0" && cd "$0" && exec "$@"', cwd, *argv]
    return [sys.executable, str(tool), "run", "-q", *chosen, *carry, "--", *inner]


def run_in_testbed(name: str, argv: list[str], kernel: str | None = None) -> int:
    """`kvmits NAME ...` on a non-arm64 host: say so, run `kvmits ARGV` in the testbed (on
    `kernel`) with its output passed through, and return its exit status (2 if there is no
    testbed; the testbed's own statuses otherwise, e.g. 123 for a guest kernel fault)."""
    cmd = testbed_command(argv, kernel)
    if cmd is None:
        print(f"kvmits {name} needs arm64 KVM; on other hosts it runs in the testbed of a kvmits "
              "source tree (tools/testbed), which this installation does not have.", file=sys.stderr)
        return 2
    print(f"kvmits {name}: this is {platform.machine()}, running in the arm64 testbed "
          "(builds it on first use: a few minutes) ...", file=sys.stderr, flush=True)
    return subprocess.call(cmd, cwd=SOURCE_ROOT)
