"""Thin, typed wrappers of KVM's file descriptors: one class per kernel object.

Kvm (/dev/kvm) -> Vm (a VM fd) -> Vcpu (a vCPU fd, with its kvm_run page) and Device (a
KVM_CREATE_DEVICE fd); GuestMemory is guest RAM; EventFd feeds irqfds. Every failing ioctl
raises kvmits.errors.KvmError naming the ioctl and the errno.
"""

from kvmits.kvm.device import Device
from kvmits.kvm.eventfd import EventFd
from kvmits.kvm.memory import GuestMemory
from kvmits.kvm.system import DEFAULT_DEVICE, Kvm
from kvmits.kvm.vcpu import (Exit, FailEntryExit, InternalErrorExit, IntrExit, IoExit, MmioExit, OtherExit,
                             SystemEventExit, Vcpu)
from kvmits.kvm.vm import IrqchipRoute, MsiRoute, Vm, arm_irq

__all__ = ["Kvm", "Vm", "Vcpu", "Device", "GuestMemory", "EventFd", "MsiRoute", "IrqchipRoute", "arm_irq",
           "Exit", "MmioExit", "IntrExit", "SystemEventExit", "FailEntryExit", "InternalErrorExit", "IoExit",
           "OtherExit", "DEFAULT_DEVICE"]
