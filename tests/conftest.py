"""Shared fixtures: a real /dev/kvm when this host has one, else a skip that says why; the
arm64 fixtures come from kvmits' pytest plugin (kvmits.pytest_plugin)."""

from __future__ import annotations

import os
import platform

import pytest

from kvmits.errors import KvmError

# kvmits' pytest plugin (its_kind, its_lab, arm64_kvm, the arm64_kvm marker, --kvmits-its): our
# own tests use it as users do; loaded here too for the testbed, where kvmits is not installed
pytest_plugins = ["kvmits.pytest_plugin"]


# (the plugin's own checks, for our tests' skips; imported when called, so that pytest imports
# the plugin itself first and can rewrite its asserts)
def kvm_unavailable_reason() -> str | None:
    from kvmits.pytest_plugin import kvm_unavailable_reason as reason

    return reason()


def arm64_kvm_unavailable_reason() -> str | None:
    from kvmits.pytest_plugin import arm64_kvm_unavailable_reason as reason

    return reason()


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
