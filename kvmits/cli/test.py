"""`kvmits test PATH...`: run a user's test files with kvmits' pytest plugin (docs/writing-tests.md).

On an arm64 KVM host pytest runs here. Elsewhere it runs inside the arm64 testbed
(tools/testbed of a kvmits source tree): the test files and directories given, the conftest.py
beside each test file, and every --file (images, disks, data the tests read) are carried in, at
the same paths under /job/files, and pytest runs in the copy of the current directory. pytest's
output and exit status come back as they are (the testbed's own: 123 a guest kernel fault, 124
its time limit, 125 the testbed failed).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from kvmits.cli.testbed import (
    add_kernel_option, guest_path, kernel_refused, needs_testbed, testbed_files_command,
)

EXIT_USAGE = 4          # pytest's own status for a usage error


def unreadable(paths: list[str]) -> str | None:
    """The first path that is missing or unreadable, in words; None if all can be read."""
    for path in paths:
        if not os.path.exists(path):
            return f"{path}: no such file or directory"
        if not os.access(path, os.R_OK):
            return f"{path}: not readable"
    return None


def carried(paths: list[str], files: list[str]) -> list[str]:
    """What goes into the testbed: the paths, the conftest.py beside each test file, the files."""
    out: list[str] = []
    for path in paths:
        out.append(path)
        if os.path.isfile(path):
            conftest = os.path.join(os.path.dirname(os.path.abspath(path)), "conftest.py")
            if os.path.isfile(conftest):
                out.append(conftest)
    out += files
    seen: set[str] = set()
    return [p for p in (os.path.abspath(p) for p in out) if not (p in seen or seen.add(p))]


def pytest_args(args, paths: list[str]) -> list[str]:
    return ["-p", "kvmits.pytest_plugin", "--kvmits-its", args.its, "--kvmits-cpus", str(args.cpus),
            *paths, *args.pytest_args]


def cmd_test(args) -> int:
    refused = kernel_refused("test", args)
    if refused is not None:
        return refused
    problem = unreadable(args.paths + args.file)
    if problem:
        print(f"kvmits test: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not needs_testbed():
        return subprocess.call([sys.executable, "-m", "pytest", *pytest_args(args, args.paths)])
    cwd = os.getcwd()
    inner = pytest_args(args, [guest_path(os.path.abspath(p)) for p in args.paths])
    cmd = testbed_files_command(["python3", "-m", "pytest", *inner], carried(args.paths, args.file),
                                cwd=guest_path(cwd), kernel=args.kernel)
    if cmd is None:
        print("kvmits test needs arm64 KVM; on other hosts it runs in the testbed of a kvmits source tree "
              "(tools/testbed), which this installation does not have.", file=sys.stderr)
        return EXIT_USAGE
    print("kvmits test: this host has no arm64 KVM: running pytest in the arm64 testbed ...", file=sys.stderr,
          flush=True)
    return subprocess.call(cmd)


def register(sub) -> None:
    p = sub.add_parser("test", help="run your test files with kvmits' pytest plugin (in the testbed off arm64)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="test files or directories")
    p.add_argument("--its", default="kernel,user", metavar="KINDS",
                   help="ITS kinds each test runs on (the plugin's --kvmits-its; default: %(default)s)")
    p.add_argument("--cpus", type=int, default=4, metavar="N", help="vCPUs of the plugin's machines (default 4)")
    p.add_argument("--file", action="append", default=[], metavar="PATH",
                   help="also carry PATH into the testbed (an image, a disk, data your tests read), at the same "
                        "path; repeatable")
    p.add_argument("--pytest-args", default="", metavar="ARGS", type=shlex.split,
                   help="more pytest arguments, as one string: --pytest-args=\"-k movi -x\"")
    add_kernel_option(p)
    p.set_defaults(func=cmd_test)
