"""The guest-physical memory map: QEMU's arm64 `virt` board, the parts kvmits uses.

    0x0800_0000  GICD            64 KiB   in-kernel vGICv3 Distributor
    0x0808_0000  ITS            128 KiB   in-kernel ITS (when the machine has one)
    0x080A_0000  GICR     128 KiB/vCPU    one redistributor per vCPU, up to 0x0900_0000
    0x0900_0000  PL011 UART       4 KiB
    0x0A00_0000  agent mailbox    4 KiB   (kvmits.machine.devices.agent_mailbox, when enabled)
    0x0B00_0000  hidden ITS     128 KiB   its="user" only: the in-kernel ITS the userspace ITS
                                          delivers through, covered by a read-write slot
    0x0C00_0000  hidden ITS's     1 MiB   its="user" only: its tables and command queue, a
                 private memory           read-only slot for the guest
    0x1000_0000  PCIe MMIO  ~751 MiB      the 32-bit window Linux assigns BARs in (QEMU virt's
                                          VIRT_PCIE_MMIO), when the machine has PCI devices
    0x3F00_0000  PCIe ECAM        1 MiB   configuration space of bus 0 (QEMU virt's
                                          VIRT_PCIE_ECAM; one bus instead of QEMU's 16)
    0x4000_0000  RAM      user's choice

Guest programs and Linux find the same devices where QEMU's `virt` puts them, so what works
under one usually works under the other. The hidden ITS and its memory sit in the hole between
the mailbox and RAM, and the device tree describes neither (kvmits.machine.its.hidden). The
PCIe windows are QEMU's, so nothing of kvmits' own moved for them; QEMU's PIO window
(0x3EFF_0000) is left out: virtio-pci modern devices have no I/O BARs.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmits.gic.regs import GICR_STRIDE
from kvmits.gic.vgic import GICD_SIZE
from kvmits.its.registers import ITS_FRAME_SIZE
from kvmits.machine.agent.protocol import MAILBOX_BASE, MAILBOX_SIZE
from kvmits.machine.pci.host import ECAM_BUS_SIZE

GICD_BASE = 0x0800_0000
ITS_BASE = 0x0808_0000
GICR_BASE = 0x080A_0000
UART_BASE = 0x0900_0000
UART_SIZE = 0x1000
#: the hidden in-kernel ITS of its="user" (a 128 KiB ITS frame), and its private memory
HIDDEN_ITS_BASE = 0x0B00_0000
HIDDEN_ITS_PRIVATE_BASE = 0x0C00_0000
HIDDEN_ITS_PRIVATE_SIZE = 0x10_0000
#: PCIe: the 32-bit memory window for BARs and the ECAM configuration space of bus 0
PCIE_MMIO_BASE = 0x1000_0000
PCIE_MMIO_SIZE = 0x2EFF_0000
PCIE_ECAM_BASE = 0x3F00_0000
RAM_BASE = 0x4000_0000

#: the redistributors must end before the UART: (0x0900_0000 - 0x080A_0000) / 128 KiB = 123 vCPUs
MAX_CPUS = (UART_BASE - GICR_BASE) // GICR_STRIDE
#: KVM_CREATE_VM with type 0 gives a 40-bit IPA space (arm64 default); RAM must fit below it
IPA_LIMIT = 1 << 40
#: RAM is a whole number of 2 MiB blocks (a Linux Image is placed on a 2 MiB boundary)
RAM_GRANULE = 2 << 20

# SPI numbers (INTID - 32) of the devices that raise interrupts, as on QEMU virt.
UART_SPI = 1


class Region(NamedTuple):
    """A named guest-physical range [base, base + size)."""

    name: str
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.base <= gpa and gpa + size <= self.end

    def overlaps(self, other: Region) -> bool:
        return self.base < other.end and other.base < self.end


class MemoryMap:
    """The map for `cpus` vCPUs and `ram_size` bytes of RAM (checked against the layout)."""

    def __init__(self, cpus: int, ram_size: int):
        if not 1 <= cpus <= MAX_CPUS:
            raise ValueError(f"cpus must be 1..{MAX_CPUS} (redistributors end at the UART), not {cpus}")
        if ram_size <= 0 or ram_size % RAM_GRANULE:
            raise ValueError(f"RAM size must be a positive multiple of 2 MiB, not {ram_size:#x}")
        if RAM_BASE + ram_size > IPA_LIMIT:
            raise ValueError(f"RAM of {ram_size:#x} bytes at {RAM_BASE:#x} exceeds the 40-bit IPA space")
        self.cpus = cpus
        self.gicd = Region("gicd", GICD_BASE, GICD_SIZE)
        self.its = Region("its", ITS_BASE, ITS_FRAME_SIZE)
        self.gicr = Region("gicr", GICR_BASE, cpus * GICR_STRIDE)
        self.uart = Region("uart", UART_BASE, UART_SIZE)
        self.agent = Region("agent", MAILBOX_BASE, MAILBOX_SIZE)
        self.hidden_its = Region("hidden-its", HIDDEN_ITS_BASE, ITS_FRAME_SIZE)
        self.hidden_its_private = Region("hidden-its-private", HIDDEN_ITS_PRIVATE_BASE, HIDDEN_ITS_PRIVATE_SIZE)
        self.pcie_mmio = Region("pcie-mmio", PCIE_MMIO_BASE, PCIE_MMIO_SIZE)
        self.pcie_ecam = Region("pcie-ecam", PCIE_ECAM_BASE, ECAM_BUS_SIZE)
        self.ram = Region("ram", RAM_BASE, ram_size)

    def gicr_base(self, cpu: int) -> int:
        """RD_base of vCPU `cpu`'s redistributor."""
        if not 0 <= cpu < self.cpus:
            raise ValueError(f"no vCPU {cpu}")
        return GICR_BASE + cpu * GICR_STRIDE

    def regions(self) -> tuple[Region, ...]:
        return (self.gicd, self.its, self.gicr, self.uart, self.agent, self.hidden_its, self.hidden_its_private,
                self.pcie_mmio, self.pcie_ecam, self.ram)

    def __repr__(self) -> str:
        return "MemoryMap(" + ", ".join(f"{r.name}={r.base:#x}+{r.size:#x}" for r in self.regions()) + ")"
