"""A vCPU fd: KVM_RUN on the mmap'd kvm_run page, typed exits, register access."""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading

from kvmits import uapi
from kvmits.errors import KvmError
from kvmits.kvm._ioctl import address_of, ioctl, thread_pointer_changed

ffi = uapi.ffi
_libc_ioctl = uapi.libc.ioctl
_KVM_RUN = uapi.KVM_RUN
_KVM_EXIT_MMIO = uapi.KVM_EXIT_MMIO
_NULL_ARG = ffi.cast("unsigned long", 0)
_get_ident = threading.get_ident     # pthread_self() (kvmits.kvm._ioctl.thread_pointer_changed)

# kvm_run from exit_reason (offset 8) to mmio.is_write: one unpack per exit, no slicing.
# The offsets are those of struct kvm_run in include/kvmits.h (checked by the layout test).
_RUN_OFF = ffi.offsetof("struct kvm_run", "exit_reason")
_MMIO_OFF = ffi.offsetof("struct kvm_run", "mmio")
_RUN_HEAD = struct.Struct(f"<I{_MMIO_OFF - _RUN_OFF - 4}xQQIB")
_MMIO_DATA_OFF = _MMIO_OFF + 8
_U64 = struct.Struct("<Q")
_DATA_MASK = (0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF, 0xFF_FFFFFFFF, 0xFFFF_FFFFFFFF, 0xFFFFFF_FFFFFFFF,
              0xFFFFFFFF_FFFFFFFF)
_IMMEDIATE_EXIT_OFF = ffi.offsetof("struct kvm_run", "immediate_exit")


class Exit:
    """Base of the typed KVM_RUN results; `reason` is the kvm_run.exit_reason value."""

    __slots__ = ("reason",)

    def __init__(self, reason: int):
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason})"


class MmioExit(Exit):
    """KVM_EXIT_MMIO: one object per vCPU, refilled by every MMIO exit (the hot path allocates
    nothing). For a read, answer with Vcpu.complete_mmio_read(value) before the next run()."""

    __slots__ = ("phys_addr", "size", "is_write", "data")

    def __init__(self):
        super().__init__(uapi.KVM_EXIT_MMIO)
        self.phys_addr = 0
        self.size = 0
        self.is_write = 0
        self.data = 0          # the written value (little-endian, `size` bytes) for a write

    def __repr__(self) -> str:
        kind = f"write {self.data:#x}" if self.is_write else "read"
        return f"MmioExit({kind} {self.size}B at {self.phys_addr:#x})"


class IntrExit(Exit):
    """KVM_RUN returned EINTR: a signal arrived (or immediate_exit was set). Not an error."""

    __slots__ = ()
    #: reason for EINTR; not a kernel exit reason (the kernel's KVM_EXIT_INTR is 10, and some
    #: architectures return that instead of EINTR; both map to this object)
    EXIT_INTR = -errno.EINTR

    def __init__(self):
        super().__init__(self.EXIT_INTR)


class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: e.g. PSCI SYSTEM_OFF (type KVM_SYSTEM_EVENT_SHUTDOWN) or RESET."""

    __slots__ = ("type", "flags")

    def __init__(self, type_: int, flags: int):
        super().__init__(uapi.KVM_EXIT_SYSTEM_EVENT)
        self.type = type_
        self.flags = flags

    def __repr__(self) -> str:
        return f"SystemEventExit(type={self.type}, flags={self.flags:#x})"


class FailEntryExit(Exit):
    __slots__ = ("hardware_entry_failure_reason", "cpu")

    def __init__(self, reason_code: int, cpu: int):
        super().__init__(uapi.KVM_EXIT_FAIL_ENTRY)
        self.hardware_entry_failure_reason = reason_code
        self.cpu = cpu


class InternalErrorExit(Exit):
    __slots__ = ("suberror", "data")

    def __init__(self, suberror: int, data: tuple[int, ...]):
        super().__init__(uapi.KVM_EXIT_INTERNAL_ERROR)
        self.suberror = suberror
        self.data = data


class IoExit(Exit):
    """KVM_EXIT_IO (x86 port I/O): direction, size, port, count and the data bytes."""

    __slots__ = ("direction", "size", "port", "count", "data_offset")

    def __init__(self, direction: int, size: int, port: int, count: int, data_offset: int):
        super().__init__(uapi.KVM_EXIT_IO)
        self.direction, self.size, self.port, self.count, self.data_offset = direction, size, port, count, data_offset


class OtherExit(Exit):
    """Any exit reason kvmits does not decode; the raw kvm_run page is on the Vcpu."""

    __slots__ = ()


class Vcpu:
    """One vCPU: `run()` enters the guest and returns a typed exit."""

    EXIT_INTR = IntrExit.EXIT_INTR
    INTR = IntrExit()

    def __init__(self, vm, fd: int, index: int, mmap_size: int):
        self.vm = vm
        self.fd = fd
        self.index = index
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer(self._map)
        #: the kvm_run page as a cffi struct, for the rare exits and for tests
        self.run_struct = ffi.cast("struct kvm_run *", self._run_buf)
        self.mmio = MmioExit()
        self._reg = ffi.new("uint64_t *")
        self._one_reg = ffi.new("struct kvm_one_reg *", {"addr": address_of(self._reg)})

    # -- KVM_RUN ---------------------------------------------------------------------------
    def run(self) -> Exit:
        """Enter the guest until it exits. EINTR returns Vcpu.INTR; other errors raise KvmError."""
        me = _get_ident()
        ret = _libc_ioctl(self.fd, _KVM_RUN, _NULL_ARG)
        if _get_ident() != me:
            thread_pointer_changed(f"KVM_RUN of vCPU {self.index}", me)
        if ret < 0:
            err = ffi.errno
            if err == errno.EINTR:
                return self.INTR
            # the return value too, should it not be -1 (a KVM_RUN that failed with "errno 0" on
            # 6.1 turned out to be the thread-pointer bug above: errno went to another TLS)
            raise KvmError("KVM_RUN", err, f"vcpu {self.index}" + ("" if ret == -1 else f", returned {ret}"))
        reason, phys, data, length, is_write = _RUN_HEAD.unpack_from(self._map, _RUN_OFF)
        if reason == _KVM_EXIT_MMIO:
            m = self.mmio
            m.phys_addr = phys
            m.size = length
            m.is_write = is_write
            m.data = data & _DATA_MASK[length & 15] if length <= 8 else data
            return m
        return self._decode_exit(reason)

    def complete_mmio_read(self, value: int) -> None:
        """Answer the pending MMIO read: KVM copies mmio.len bytes of mmio.data to the guest."""
        _U64.pack_into(self._map, _MMIO_DATA_OFF, value & 0xFFFFFFFF_FFFFFFFF)

    def _decode_exit(self, reason: int) -> Exit:
        r = self.run_struct
        if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            return SystemEventExit(r.system_event.type, r.system_event.flags)
        if reason == uapi.KVM_EXIT_INTR:
            return self.INTR
        if reason == uapi.KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(r.fail_entry.hardware_entry_failure_reason, r.fail_entry.cpu)
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            n = min(r.internal.ndata, 16)
            return InternalErrorExit(r.internal.suberror, tuple(r.internal.data[i] for i in range(n)))
        if reason == uapi.KVM_EXIT_IO:
            io = r.io
            return IoExit(io.direction, io.size, io.port, io.count, io.data_offset)
        return OtherExit(reason)

    def io_data(self, exit_: IoExit) -> memoryview:
        """The data bytes of a KVM_EXIT_IO, inside the kvm_run page (read or fill them)."""
        n = exit_.size * exit_.count
        return memoryview(self._map)[exit_.data_offset:exit_.data_offset + n]

    @property
    def immediate_exit(self) -> int:
        return self._map[_IMMEDIATE_EXIT_OFF]

    @immediate_exit.setter
    def immediate_exit(self, value: int) -> None:
        # kvm_run.immediate_exit: KVM_RUN returns EINTR at once while it is set (api.rst, 5.)
        self._map[_IMMEDIATE_EXIT_OFF] = 1 if value else 0

    # -- registers -------------------------------------------------------------------------
    def get_one_reg(self, reg_id: int) -> int:
        self._one_reg.id = reg_id
        ioctl(self.fd, "KVM_GET_ONE_REG", self._one_reg, detail=f"id={reg_id:#x}")
        return self._reg[0]

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self._one_reg.id = reg_id
        self._reg[0] = value
        ioctl(self.fd, "KVM_SET_ONE_REG", self._one_reg, detail=f"id={reg_id:#x}")

    @staticmethod
    def reg_size(reg_id: int) -> int:
        """The size in bytes of register `reg_id` (its KVM_REG_SIZE field)."""
        return 1 << ((reg_id & uapi.KVM_REG_SIZE_MASK) >> uapi.KVM_REG_SIZE_SHIFT)

    def get_reg_bytes(self, reg_id: int) -> bytes:
        """KVM_GET_ONE_REG of a register of any size (the arm64 FP/SIMD V registers are 128-bit)."""
        buf = ffi.new("uint8_t[]", self.reg_size(reg_id))
        arg = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": address_of(buf)})
        ioctl(self.fd, "KVM_GET_ONE_REG", arg, detail=f"id={reg_id:#x}")
        return bytes(ffi.buffer(buf))

    def set_reg_bytes(self, reg_id: int, data: bytes) -> None:
        size = self.reg_size(reg_id)
        if len(data) != size:
            raise ValueError(f"register {reg_id:#x} has {size} bytes, not {len(data)}")
        buf = ffi.new("uint8_t[]", data)
        arg = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": address_of(buf)})
        ioctl(self.fd, "KVM_SET_ONE_REG", arg, detail=f"id={reg_id:#x}")

    def reg_list(self) -> list[int]:
        """KVM_GET_REG_LIST: the id of every register KVM_GET/SET_ONE_REG moves for this vCPU
        (arm64: core, FP/SIMD, system registers, timers, firmware pseudo-registers). Asked once
        with n = 0 for the count (E2BIG), then with room for it."""
        probe = ffi.new("struct kvm_reg_list *")
        try:
            ioctl(self.fd, "KVM_GET_REG_LIST", probe)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        n = probe.n
        # a flexible array member: the header and n ids in one block (`block` keeps it alive)
        block = ffi.new("uint64_t[]", 1 + n)
        full = ffi.cast("struct kvm_reg_list *", block)
        full.n = n
        ioctl(self.fd, "KVM_GET_REG_LIST", full, detail=f"n={n}")
        return list(block[1:1 + full.n])

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: uapi.KVM_MP_STATE_* (arm64: RUNNABLE, STOPPED, SUSPENDED)."""
        state = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, "KVM_GET_MP_STATE", state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}),
              detail=f"mp_state={mp_state}")

    # arm64
    def arm_init(self, features=(uapi.KVM_ARM_VCPU_PSCI_0_2,), target: int | None = None) -> None:
        """KVM_ARM_VCPU_INIT with the VM's preferred target and the given feature bit numbers."""
        init = self.vm.arm_preferred_target() if target is None else ffi.new("struct kvm_vcpu_init *", {"target": target})
        for bit in features:
            init.features[bit // 32] |= 1 << (bit % 32)
        ioctl(self.fd, "KVM_ARM_VCPU_INIT", init, detail=f"vcpu {self.index} features={tuple(features)}")

    # x86 (the host smoke guest)
    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs) -> None:
        ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        ioctl(self.fd, "KVM_SET_SREGS", sregs)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        if self.fd < 0:
            return
        ffi.release(self._run_buf)
        self._map.close()
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return f"Vcpu({self.index}, fd={self.fd})"
