"""Shared fixtures: a real /dev/kvm when this host has one, else a skip that says why."""

from __future__ import annotations

import os
import platform

import pytest

from kvmits.errors import KvmError


def kvm_unavailable_reason() -> str | None:
    """None if /dev/kvm can be opened here, else the reason in plain words."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host (KVM module not loaded, or no hardware virtualization)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user (add it to the 'kvm' group)"
    return None


@pytest.fixture
def kvm():
    from kvmits.kvm import Kvm

    reason = kvm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        k = Kvm()
    except KvmError as exc:
        pytest.skip(f"cannot open /dev/kvm: {exc}")
    with k:
        yield k


@pytest.fixture
def x86_kvm(kvm):
    if platform.machine() != "x86_64":
        pytest.skip(f"x86 smoke guest needs an x86_64 KVM host, this is {platform.machine()}")
    return kvm


def arm64_kvm_unavailable_reason() -> str | None:
    """None if arm64 KVM VMs can run here (natively, or inside the testbed), else why not."""
    if platform.machine() != "aarch64":
        return (f"needs arm64 KVM and this host is {platform.machine()}: the arm64 tests run in the "
                "testbed: tools/testbed run -- python3 -m pytest tests/arm64")
    return kvm_unavailable_reason()


@pytest.fixture(scope="module")
def arm64_kvm():
    """Skip (saying why) unless this is an arm64 host with a usable /dev/kvm."""
    reason = arm64_kvm_unavailable_reason()
    if reason:
        pytest.skip(reason)


# In the arm64 testbed (tools/testbed sets KVMITS_TESTBED=1 in the guest): name each test on
# the console as it starts, so that a guest kernel fault (oops, panic, a KVM WARNING) is
# reported by the testbed as the failure of the test that was running. The line goes to
# /dev/console through a descriptor of its own, past pytest's output capture; the host hides
# it from the shown output. Its token (from the kernel command line) is what the host
# accepts, so a test printing an old log cannot name another test.
_testbed_console: dict = {}


def _testbed_marker_target() -> tuple[int, str] | None:
    if "fd" not in _testbed_console:
        _testbed_console["fd"] = None
        if os.environ.get("KVMITS_TESTBED") == "1":
            try:
                with open("/proc/cmdline") as f:
                    args = f.read().split()
                token = next(a.split("=", 1)[1] for a in args if a.startswith("kvmits.token="))
                fd = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
            except (OSError, StopIteration) as exc:
                # the tests still run; only a kernel fault would not be pinned on one of them
                print(f"tests/conftest.py: cannot name tests on the testbed console: {exc!r}")
            else:
                _testbed_console["fd"], _testbed_console["token"] = fd, token
    fd = _testbed_console["fd"]
    return None if fd is None else (fd, _testbed_console["token"])


def pytest_runtest_logstart(nodeid, location):
    target = _testbed_marker_target()
    if target is not None:
        fd, token = target
        os.write(fd, f"KVMITS-TESTBED-RUNNING {token} {nodeid}\n".encode())
