"""Fixtures of the arm64 tests: kvmits' pytest plugin (kvmits.pytest_plugin) gives its_kind
(kernel and user, --kvmits-its), arm64_kvm and its_lab; `lab` is our name for the plugin's lab."""

import os

import pytest

from kvmits.pytest_plugin import arm64_kvm_unavailable_reason

#: vCPUs of the shared ITS lab (the plugin's default --kvmits-cpus)
LAB_CPUS = 4


@pytest.fixture(scope="module")
def lab(its_lab):
    """A 4-vCPU ItsLab per module, once with each ITS, set up (LPIs, ITS tables, MAPC n -> n)."""
    assert its_lab.cpus == LAB_CPUS, "the arm64 tests expect --kvmits-cpus 4"
    return its_lab


@pytest.fixture(scope="session", autouse=True)
def vm_count_keeper():
    """One idle VM for the whole session, made before any test counts resources, so that KVM's
    VM count (system-wide) never drops to zero between two tests' or two machines' VMs. In the
    testbed, a process that takes it to zero and back hundreds of times breaks the host
    kernel's per-CPU state: a vCPU thread's KVM_RUN returned with another thread's TPIDR_EL0
    (the VMM then died of SIGSEGV) and KVM warned of no running vCPU inside one's own KVM_RUN,
    in 8 of 10 1,000-machine runs of tests/arm64/test_hygiene.py with the kernel's ITS on 6.1
    (VHE), and on 6.12 too; 0 of 3 with this VM held. Each time the count reaches zero,
    kvm_destroy_vm() patches KVM's preempt notifiers out (and, on 6.1, turns virtualization off
    on every CPU) and the next kvm_create_vm() back in: docs/kernels.md, "The testbed: per-CPU
    state on the wrong CPU when the VM count keeps reaching zero". Tests count what kvmits
    leaves behind relative to their own start, so this VM's two fds are in every count.
    KVMITS_VM_KEEPER=0 leaves it out, to reproduce that."""
    if arm64_kvm_unavailable_reason() is not None or os.environ.get("KVMITS_VM_KEEPER") == "0":
        yield               # (without arm64 KVM the tests skip themselves, saying why)
        return
    from kvmits.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm():
        yield
