"""A tiny x86 real-mode guest for exercising the generic KVM layer on x86_64 hosts (the host
tests of kvmits.kvm and the exit-loop benchmarks).

The guest is a handful of hand-assembled 16-bit instructions placed in guest RAM at CODE;
its MMIO window MMIO is not backed by any memory slot, so each access exits to Python.
"""

from __future__ import annotations

import struct

from kvmits.kvm import GuestMemory

RAM_GPA = 0x0
RAM_SIZE = 0x8000
CODE = 0x1000
MMIO = 0x9000          # unbacked: every access is a KVM_EXIT_MMIO


def _moffs(op: int, addr: int) -> bytes:
    return bytes([op]) + struct.pack("<H", addr)


# mov ax, 0x1234 ; mov [MMIO], ax ; mov ax, [MMIO+2] ; add ax, 1 ; mov [MMIO+4], ax ; hlt
ROUND_TRIP = (b"\xb8\x34\x12" + _moffs(0xA3, MMIO) + _moffs(0xA1, MMIO + 2) + b"\x05\x01\x00"
              + _moffs(0xA3, MMIO + 4) + b"\xf4")

# loop: mov ax, [MMIO+2] ; add ax, 1 ; mov [MMIO+4], ax ; jmp loop   (2 exits per iteration)
LOOP = _moffs(0xA1, MMIO + 2) + b"\x05\x01\x00" + _moffs(0xA3, MMIO + 4) + b"\xeb" + bytes([(-11) & 0xFF])


def boot(vm, program: bytes):
    """RAM with `program` at CODE, one vCPU in real mode at 0000:CODE. Returns (vcpu, ram)."""
    ram = GuestMemory(RAM_GPA, RAM_SIZE)
    ram.write(CODE, program)
    vm.add_memory(ram)
    return real_mode_vcpu(vm, 0), ram


def real_mode_vcpu(vm, index: int):
    """vCPU `index` in real mode, flat segments, at 0000:CODE."""
    vcpu = vm.create_vcpu(index)
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = CODE
    regs.rflags = 0x2       # bit 1 is reserved-one
    vcpu.set_regs(regs)
    return vcpu
