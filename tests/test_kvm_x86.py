"""The generic KVM layer against the real /dev/kvm of an x86_64 host, with a tiny guest."""

from __future__ import annotations

import errno

import pytest

from kvmits import uapi
from kvmits.errors import GuestMemoryError, KvmError
from kvmits.kvm import EventFd, GuestMemory, MmioExit, MsiRoute, Vcpu
from kvmits.bench import x86guest

pytestmark = pytest.mark.kvm


def test_system_fd(kvm):
    assert kvm.api_version == uapi.KVM_API_VERSION
    assert kvm.vcpu_mmap_size >= 4096
    assert kvm.check_extension(uapi.KVM_CAP_USER_MEMORY) > 0
    assert kvm.check_extension(uapi.KVM_CAP_IMMEDIATE_EXIT) > 0


def test_mmio_round_trip_through_python(x86_kvm):
    """The guest writes, reads (Python answers 41) and writes back 41 + 1, then halts."""
    with x86_kvm.create_vm() as vm:
        vcpu, ram = x86guest.boot(vm, x86guest.ROUND_TRIP)
        seen = []
        while True:
            ex = vcpu.run()
            if isinstance(ex, MmioExit):
                seen.append((ex.phys_addr, ex.size, bool(ex.is_write), ex.data if ex.is_write else None))
                if not ex.is_write:
                    vcpu.complete_mmio_read(41)
                continue
            break
        assert ex.reason == uapi.KVM_EXIT_HLT
        assert seen == [
            (x86guest.MMIO, 2, True, 0x1234),
            (x86guest.MMIO + 2, 2, False, None),
            (x86guest.MMIO + 4, 2, True, 42),
        ]
        ram.close()


def test_mmio_exit_object_is_reused(x86_kvm):
    with x86_kvm.create_vm() as vm:
        vcpu, _ = x86guest.boot(vm, x86guest.LOOP)
        first = vcpu.run()
        vcpu.complete_mmio_read(7)
        second = vcpu.run()
        assert first is second is vcpu.mmio
        assert second.is_write and second.data == 8


def test_immediate_exit_returns_eintr(x86_kvm):
    with x86_kvm.create_vm() as vm:
        vcpu, _ = x86guest.boot(vm, x86guest.LOOP)
        vcpu.immediate_exit = 1
        assert vcpu.immediate_exit == 1
        assert vcpu.run() is Vcpu.INTR
        vcpu.immediate_exit = 0
        assert isinstance(vcpu.run(), MmioExit)


def test_guest_memory_bounds_and_values(x86_kvm):
    with GuestMemory(0x10000, 0x2000) as mem:
        mem.write_u64(0x10008, 0x1122334455667788)
        assert mem.read(0x10008, 2) == b"\x88\x77"
        assert mem.read_u32(0x1000C) == 0x11223344
        with pytest.raises(GuestMemoryError, match=r"0x11fff"):
            mem.read(0x11FFF, 2)
        with pytest.raises(GuestMemoryError):
            mem.write(0xFFFF, b"x")
        assert mem.contains(0x11FFF, 1) and not mem.contains(0x12000, 1)


def test_ioctl_errors_name_the_ioctl_and_errno(x86_kvm):
    with x86_kvm.create_vm() as vm:
        x86guest.boot(vm, x86guest.ROUND_TRIP)
        with pytest.raises(KvmError) as info:
            vm.create_vcpu(0)                      # the same vCPU id twice
        assert info.value.ioctl == "KVM_CREATE_VCPU"
        assert info.value.errno == errno.EEXIST
        assert "KVM_CREATE_VCPU failed: EEXIST" in str(info.value)


def test_overlapping_memory_slot_is_refused(x86_kvm):
    with x86_kvm.create_vm() as vm, GuestMemory(0x0, 0x4000) as a, GuestMemory(0x2000, 0x4000) as b:
        vm.add_memory(a)
        with pytest.raises(KvmError) as info:
            vm.add_memory(b)
        assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION" and info.value.errno == errno.EEXIST


def test_irqchip_routing_irqfd_and_signal_msi(x86_kvm):
    """x86's in-kernel irqchip accepts MSI routes, an irqfd on one, and KVM_SIGNAL_MSI."""
    with x86_kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu, _ = x86guest.boot(vm, x86guest.ROUND_TRIP)
        lapic_msi = 0xFEE00000                  # destination APIC 0
        vm.set_gsi_routing([MsiRoute(gsi=5, address=lapic_msi, data=0x31), MsiRoute(gsi=6, address=lapic_msi, data=0x32)])
        with EventFd() as efd:
            vm.irqfd(efd, 5)
            efd.write(1)
            assert efd.read() == 0              # KVM consumed the count: the irqfd is live
            vm.irqfd_deassign(efd, 5)
            efd.write(1)
            assert efd.read() == 1              # after deassign, nobody consumes it
        assert vm.signal_msi(lapic_msi, 0x33) >= 0
        assert vm.check_extension(uapi.KVM_CAP_SIGNAL_MSI) > 0


def test_irqfd_on_bad_fd_is_a_kvm_error(x86_kvm):
    with x86_kvm.create_vm() as vm:
        vm.create_irqchip()
        efd = EventFd()
        efd.close()
        efd.fd = 10**6                          # not an open descriptor
        with pytest.raises(KvmError) as info:
            vm.irqfd(efd, 1)
        assert info.value.ioctl == "KVM_IRQFD" and info.value.errno == errno.EBADF


def _run_round_trip(vcpu):
    """Run x86guest.ROUND_TRIP to its HLT; the MMIO exits seen, reads answered with 41."""
    seen = []
    while True:
        ex = vcpu.run()
        if not isinstance(ex, MmioExit):
            assert ex.reason == uapi.KVM_EXIT_HLT
            return seen
        seen.append((ex.phys_addr, bool(ex.is_write), ex.data if ex.is_write else None))
        if not ex.is_write:
            vcpu.complete_mmio_read(41)


@pytest.mark.parametrize("datamatch, consumed", [(None, True), (0x1234, True), (0x9999, False)])
def test_ioeventfd_takes_the_write_in_the_kernel(x86_kvm, datamatch, consumed):
    """KVM_IOEVENTFD on the guest's first MMIO write (2 bytes of 0x1234): KVM signals the eventfd
    and the vCPU never exits for it; with a datamatch the write must carry that value."""
    with x86_kvm.create_vm() as vm, EventFd() as efd:
        assert vm.check_extension(uapi.KVM_CAP_IOEVENTFD) > 0
        vcpu, ram = x86guest.boot(vm, x86guest.ROUND_TRIP)
        vm.ioeventfd(efd, x86guest.MMIO, 2, datamatch=datamatch)
        seen = _run_round_trip(vcpu)
        first_write = (x86guest.MMIO, True, 0x1234)
        assert (first_write not in seen) == consumed
        assert seen[-2:] == [(x86guest.MMIO + 2, False, None), (x86guest.MMIO + 4, True, 42)]
        assert efd.read() == (1 if consumed else 0)
        ram.close()


def test_ioeventfd_deassign_and_errors_name_the_ioctl(x86_kvm):
    with x86_kvm.create_vm() as vm, EventFd() as efd:
        vcpu, ram = x86guest.boot(vm, x86guest.ROUND_TRIP)
        vm.ioeventfd(efd, x86guest.MMIO, 2)
        with pytest.raises(KvmError) as info:
            vm.ioeventfd(efd, x86guest.MMIO, 2)                     # the same one twice
        assert info.value.errno == errno.EEXIST and "KVM_IOEVENTFD" in str(info.value)
        vm.ioeventfd_deassign(efd, x86guest.MMIO, 2)
        assert _run_round_trip(vcpu)[0] == (x86guest.MMIO, True, 0x1234)   # exits again
        assert efd.read() == 0
        with pytest.raises(KvmError) as info:
            vm.ioeventfd_deassign(efd, x86guest.MMIO, 2)            # not there any more
        assert info.value.errno == errno.ENOENT and "deassign" in str(info.value)
        with pytest.raises(KvmError) as info:
            vm.ioeventfd(efd, x86guest.MMIO, 3)                     # lengths are 0, 1, 2, 4, 8
        assert info.value.errno == errno.EINVAL and "len=3" in str(info.value)
        ram.close()


def test_mp_state_round_trips_and_a_refused_state_names_the_ioctl(x86_kvm):
    """KVM_GET/SET_MP_STATE, the vCPU power state a snapshot carries (issue 13). Without an
    in-kernel local APIC, x86 KVM accepts only RUNNABLE (x86.c, kvm_arch_vcpu_ioctl_set_mpstate)."""
    with x86_kvm.create_vm() as vm:
        vcpu, ram = x86guest.boot(vm, x86guest.ROUND_TRIP)
        assert vcpu.get_mp_state() == uapi.KVM_MP_STATE_RUNNABLE
        vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
        with pytest.raises(KvmError) as info:
            vcpu.set_mp_state(3)                   # KVM_MP_STATE_HALTED needs the in-kernel LAPIC
        assert info.value.ioctl == "KVM_SET_MP_STATE" and info.value.errno == errno.EINVAL
        assert "mp_state=3" in str(info.value)


def test_one_reg_of_any_size_and_reg_list_errors(x86_kvm):
    """Vcpu.reg_size reads KVM_REG_SIZE; get_reg_bytes/set_reg_bytes check the length before
    any ioctl, and an id KVM does not know is the ioctl's error. KVM_GET_REG_LIST is arm64's
    (tested in the testbed); older x86 KVM refuses it, and the error names it."""
    assert Vcpu.reg_size(uapi.KVM_REG_ARM64 | uapi.KVM_REG_SIZE_U64 | 1) == 8
    assert Vcpu.reg_size(0x0040000000000000) == 16           # KVM_REG_SIZE_U128
    with x86_kvm.create_vm() as vm:
        vcpu, ram = x86guest.boot(vm, x86guest.ROUND_TRIP)
        with pytest.raises(ValueError, match="has 8 bytes, not 4"):
            vcpu.set_reg_bytes(uapi.KVM_REG_SIZE_U64, b"\0" * 4)
        try:
            ids = vcpu.reg_list()
        except KvmError as e:                     # before x86 KVM had one-reg ids (6.1's)
            assert e.ioctl == "KVM_GET_REG_LIST", e
        else:                                     # newer x86 KVM lists its one-reg ids (6.18: none)
            assert all(len(vcpu.get_reg_bytes(i)) == Vcpu.reg_size(i) for i in ids)
        with pytest.raises(KvmError) as info:
            vcpu.get_reg_bytes(uapi.KVM_REG_ARM64 | uapi.KVM_REG_SIZE_U64 | 1)
        assert info.value.ioctl == "KVM_GET_ONE_REG" and "id=0x6030000000000001" in str(info.value)
