"""KVM ioctl numbers, computed from the _IOC encoding (include/uapi/asm-generic/ioctl.h).

x86_64 and arm64 share the asm-generic encoding: bits 0-7 number, 8-15 type (KVMIO),
16-29 argument size, 30-31 direction. The sizes come from the cffi declarations, so a wrong
struct layout also shows up as a wrong ioctl number in tests/test_uapi_layout.py.
"""

from __future__ import annotations

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


# name -> (direction, number, argument type or None, where: "generic", "x86" or "arm64"); as in
# include/uapi/linux/kvm.h. `where` marks the x86-only and arm64-only ones, so that the layout
# test checks each against its own architecture's headers.
IOCTLS: dict[str, tuple[int, int, str | None, str]] = {
    # /dev/kvm
    "KVM_GET_API_VERSION": (_IOC_NONE, 0x00, None, "generic"),
    "KVM_CREATE_VM": (_IOC_NONE, 0x01, None, "generic"),
    "KVM_CHECK_EXTENSION": (_IOC_NONE, 0x03, None, "generic"),
    "KVM_GET_VCPU_MMAP_SIZE": (_IOC_NONE, 0x04, None, "generic"),
    # VM fd
    "KVM_CREATE_VCPU": (_IOC_NONE, 0x41, None, "generic"),
    "KVM_SET_USER_MEMORY_REGION": (_IOC_WRITE, 0x46, "struct kvm_userspace_memory_region", "generic"),
    "KVM_CREATE_IRQCHIP": (_IOC_NONE, 0x60, None, "generic"),
    "KVM_IRQ_LINE": (_IOC_WRITE, 0x61, "struct kvm_irq_level", "generic"),
    "KVM_SET_GSI_ROUTING": (_IOC_WRITE, 0x6A, "struct kvm_irq_routing", "generic"),
    "KVM_IRQFD": (_IOC_WRITE, 0x76, "struct kvm_irqfd", "generic"),
    "KVM_IOEVENTFD": (_IOC_WRITE, 0x79, "struct kvm_ioeventfd", "generic"),
    "KVM_SIGNAL_MSI": (_IOC_WRITE, 0xA5, "struct kvm_msi", "generic"),
    "KVM_CREATE_DEVICE": (_IOC_READ | _IOC_WRITE, 0xE0, "struct kvm_create_device", "generic"),
    "KVM_ARM_PREFERRED_TARGET": (_IOC_READ, 0xAF, "struct kvm_vcpu_init", "arm64"),
    # vCPU fd
    "KVM_RUN": (_IOC_NONE, 0x80, None, "generic"),
    "KVM_GET_REGS": (_IOC_READ, 0x81, "struct kvm_regs", "x86"),
    "KVM_SET_REGS": (_IOC_WRITE, 0x82, "struct kvm_regs", "x86"),
    "KVM_GET_SREGS": (_IOC_READ, 0x83, "struct kvm_sregs", "x86"),
    "KVM_SET_SREGS": (_IOC_WRITE, 0x84, "struct kvm_sregs", "x86"),
    "KVM_GET_MP_STATE": (_IOC_READ, 0x98, "struct kvm_mp_state", "generic"),
    "KVM_SET_MP_STATE": (_IOC_WRITE, 0x99, "struct kvm_mp_state", "generic"),
    "KVM_GET_ONE_REG": (_IOC_WRITE, 0xAB, "struct kvm_one_reg", "generic"),
    "KVM_SET_ONE_REG": (_IOC_WRITE, 0xAC, "struct kvm_one_reg", "generic"),
    "KVM_ARM_VCPU_INIT": (_IOC_WRITE, 0xAE, "struct kvm_vcpu_init", "arm64"),
    "KVM_GET_REG_LIST": (_IOC_READ | _IOC_WRITE, 0xB0, "struct kvm_reg_list", "generic"),
    # device fd
    "KVM_SET_DEVICE_ATTR": (_IOC_WRITE, 0xE1, "struct kvm_device_attr", "generic"),
    "KVM_GET_DEVICE_ATTR": (_IOC_WRITE, 0xE2, "struct kvm_device_attr", "generic"),
    "KVM_HAS_DEVICE_ATTR": (_IOC_WRITE, 0xE3, "struct kvm_device_attr", "generic"),
}


def ioctl_numbers(ffi) -> dict[str, int]:
    """name -> request number, with argument sizes taken from `ffi`'s declarations."""
    out = {}
    for name, (direction, nr, argtype, _arch) in IOCTLS.items():
        out[name] = _ioc(direction, nr, ffi.sizeof(argtype) if argtype else 0)
    return out

