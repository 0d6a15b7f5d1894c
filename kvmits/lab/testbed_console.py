"""Naming the work in progress on the arm64 testbed's console, so that a guest kernel fault
(an oops, a panic, a WARNING in KVM) is reported as the failure of what was running.

tools/testbed boots its guest with `kvmits.token=<random>` on the kernel command line and sets
KVMITS_TESTBED=1. A line

    KVMITS-TESTBED-RUNNING <token> <name>

written to /dev/console (past any output capture, through a descriptor of its own) tells the
host what runs now (tools/testbed_lib/console.py): pytest's hook in tests/conftest.py writes a
test's node id, the guest-side fuzzer (kvmits.fuzz.guest) the ITS and seed of each stream. The
token is what the host accepts, so a program printing an old log cannot name another test.
"""

from __future__ import annotations

import os

RUNNING = "KVMITS-TESTBED-RUNNING"


class TestbedConsole:
    """The testbed's console, if this process runs in the testbed; else every call is a no-op."""

    __test__ = False    # not a pytest test class, for all its name

    def __init__(self, environ=os.environ, cmdline: str = "/proc/cmdline", console: str = "/dev/console"):
        self.fd: int | None = None
        self.token: str | None = None
        #: why the console cannot be named on, when in the testbed (None: it can, or not a testbed)
        self.problem: str | None = None
        if environ.get("KVMITS_TESTBED") != "1":
            return
        try:
            with open(cmdline) as f:
                args = f.read().split()
            token = next(a.split("=", 1)[1] for a in args if a.startswith("kvmits.token="))
            fd = os.open(console, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except (OSError, StopIteration) as exc:
            self.problem = f"cannot name work on the testbed console: {exc!r}"
        else:
            self.fd, self.token = fd, token

    @property
    def active(self) -> bool:
        return self.fd is not None

    def running(self, name: str) -> None:
        """Say that `name` (one line, no token of the host's) runs from now on."""
        if self.fd is None:
            return
        if "\n" in name:
            raise ValueError("a running marker's name is one line")
        os.write(self.fd, f"{RUNNING} {self.token} {name}\n".encode())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
