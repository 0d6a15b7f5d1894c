"""An arm64 VM to boot guests on. See docs/machine.md.

- the core: machine (Machine, MachineConfig), memmap, devicetree, loader, runner (vCPU threads),
  bus (KVM_EXIT_MMIO dispatch), control (the JSON-lines control socket);
- devices/: the device models on the bus (PL011, the guest agent's mailbox);
- agent/: the guest agent's protocol and the host API that drives a guest through it;
- its/: the machine's ITS, one interface (MachineIts) over the kernel's ITS and kvmits' own.
"""

from kvmits.machine.bus import MmioBus, MmioDevice
from kvmits.machine.loader import BootImage, BootLayout, ImageError
from kvmits.machine.machine import ITS_KINDS, Machine, MachineConfig
from kvmits.machine.memmap import MemoryMap, Region
from kvmits.machine.devices.pl011 import Pl011
from kvmits.machine.its import KernelMachineIts, MachineIts, NoItsError, UserMachineIts
from kvmits.machine.runner import (EXIT_CRASH, EXIT_POWEROFF, EXIT_RESET, EXIT_STOPPED, MachineExit, VcpuExitError,
                                   VcpuRunner, install_kick_handler)

__all__ = ["Machine", "MachineConfig", "ITS_KINDS", "MachineExit", "MemoryMap", "Region", "MmioBus", "MmioDevice",
           "Pl011", "MachineIts", "KernelMachineIts", "UserMachineIts", "NoItsError", "VcpuRunner", "VcpuExitError", "install_kick_handler", "BootImage", "BootLayout",
           "ImageError", "EXIT_POWEROFF", "EXIT_RESET", "EXIT_CRASH", "EXIT_STOPPED"]
