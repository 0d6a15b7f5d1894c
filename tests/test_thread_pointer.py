"""The thread-pointer check of every KVM ioctl (kvmits.kvm._ioctl.thread_pointer_changed), on
the x86_64 host's real /dev/kvm: an ioctl that comes back to a thread whose pthread_self()
changed - what 6.1's KVM_RUN did in the arm64 testbed (docs/kernels.md) - aborts the process
with a message that names the ioctl, instead of running on another thread's TLS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from kvmits import uapi
from kvmits.bench import x86guest
from kvmits.kvm import _ioctl, vcpu as vcpu_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ident_changing(before: int, after: int):
    """A pthread_self() that returns `before` on the call ahead of the ioctl, `after` since."""
    calls = []
    return lambda: calls.append(None) or (before if len(calls) == 1 else after)


@pytest.fixture
def reported(monkeypatch):
    seen = []
    monkeypatch.setattr(vcpu_module, "thread_pointer_changed", lambda *a: seen.append(a))
    monkeypatch.setattr(_ioctl, "thread_pointer_changed", lambda *a: seen.append(a))
    return seen


@pytest.mark.kvm
def test_kvm_run_back_on_another_threads_pointer_is_reported(x86_kvm, monkeypatch, reported):
    with x86_kvm.create_vm() as vm:
        vcpu, _ = x86guest.boot(vm, x86guest.LOOP)
        monkeypatch.setattr(vcpu_module, "_get_ident", ident_changing(0x1000, 0x2000))
        assert vcpu.run().reason == uapi.KVM_EXIT_MMIO
        assert reported == [("KVM_RUN of vCPU 0", 0x1000)]


@pytest.mark.kvm
def test_kvm_run_on_its_own_pointer_is_not(x86_kvm, reported):
    with x86_kvm.create_vm() as vm:
        vcpu, _ = x86guest.boot(vm, x86guest.LOOP)
        vcpu.immediate_exit = 1
        assert vcpu.run() is vcpu.INTR
        vcpu.immediate_exit = 0
        assert vcpu.run().reason == uapi.KVM_EXIT_MMIO
        assert reported == []


@pytest.mark.kvm
def test_every_other_kvm_ioctl_is_checked_too(x86_kvm, monkeypatch, reported):
    monkeypatch.setattr(_ioctl, "_get_ident", ident_changing(5, 6))
    assert _ioctl.ioctl(x86_kvm.fd, "KVM_GET_API_VERSION") == uapi.KVM_API_VERSION
    assert reported == [("KVM_GET_API_VERSION", 5)]


def test_the_check_aborts_the_process_with_a_message():
    child = subprocess.run(
        [sys.executable, "-c", "from kvmits.kvm import _ioctl; _ioctl.thread_pointer_changed('KVM_RUN of vCPU 3', 16)"],
        cwd=ROOT, capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGABRT
    assert b"kvmits: KVM_RUN of vCPU 3 returned to a thread whose thread pointer is another thread's" in child.stderr
    assert b"pthread_self() was 0x10, is 0x" in child.stderr
