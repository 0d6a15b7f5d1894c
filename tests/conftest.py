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
