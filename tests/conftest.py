"""Shared fixtures: a real /dev/kvm when this host has one, else a skip that says why; the
arm64 fixtures come from kvmits' pytest plugin (kvmits.pytest_plugin)."""

from __future__ import annotations

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
# the console as it starts (kvmits.lab.testbed_console), so that a guest kernel fault (oops,
# panic, a KVM WARNING) is reported by the testbed as the failure of the test that was running.
_testbed_console: list = []


def pytest_runtest_logstart(nodeid, location):
    if not _testbed_console:
        from kvmits.lab.testbed_console import TestbedConsole

        _testbed_console.append(TestbedConsole())
        if _testbed_console[0].problem:
            # the tests still run; only a kernel fault would not be pinned on one of them
            print(f"tests/conftest.py: {_testbed_console[0].problem}")
    _testbed_console[0].running(nodeid)
