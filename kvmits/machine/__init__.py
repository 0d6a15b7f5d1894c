"""An arm64 VM to boot guests on: memory map, device tree, loaders, vCPU threads, MMIO bus,
PL011, MSI plumbing. See docs/machine.md."""

from kvmits.machine.bus import MmioBus, MmioDevice
from kvmits.machine.loader import BootImage, BootLayout, ImageError
from kvmits.machine.machine import ITS_KINDS, Machine, MachineConfig
from kvmits.machine.memmap import MemoryMap, Region
from kvmits.machine.its.routes import MsiRoutes
from kvmits.machine.devices.pl011 import Pl011
from kvmits.machine.runner import (EXIT_CRASH, EXIT_POWEROFF, EXIT_RESET, EXIT_STOPPED, MachineExit, VcpuExitError,
                                   VcpuRunner, install_kick_handler)

__all__ = ["Machine", "MachineConfig", "ITS_KINDS", "MachineExit", "MemoryMap", "Region", "MmioBus", "MmioDevice",
           "Pl011", "MsiRoutes", "VcpuRunner", "VcpuExitError", "install_kick_handler", "BootImage", "BootLayout",
           "ImageError", "EXIT_POWEROFF", "EXIT_RESET", "EXIT_CRASH", "EXIT_STOPPED"]
