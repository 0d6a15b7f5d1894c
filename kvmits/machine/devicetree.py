"""The device tree a guest boots with, built with the pure-Python `fdt` library.

Why `fdt`: it is on PyPI as pure Python, so it installs in our host venv and copies into the
arm64 testbed, which has no compiler. pylibfdt needs swig and a C compiler; Debian's
python3-libfdt would tie the host venv to Debian's Python.

The tree has what a Linux guest needs on this machine and nothing more (bindings in Linux's
Documentation/devicetree/bindings/): memory, cpus with reg = MPIDR_EL1 affinity and PSCI as the
enable method, psci (0.2, hvc), the GICv3 (with an ITS child when the machine has an ITS: the
guest's ITS, kernel or userspace, at the same address; never the hidden ITS behind the userspace
one), the architected timer, the PL011 with the APB clock its driver asks for, /chosen, and, when the
machine has PCI devices, the PCIe host bridge.

The PCIe node follows Documentation/devicetree/bindings/pci/host-generic-pci.yaml and
pci-msi.txt (as QEMU's virt board and kvmtool write it): `pci-host-ecam-generic` with the ECAM
window of bus 0 as `reg`, `bus-range = <0 0>`, one 32-bit non-prefetchable memory range, and
`msi-map = <0 &its 0 0x100>`: requester ID (bus << 8 | devfn) = ITS DeviceID, one to one, for
the 256 functions of bus 0. No `interrupt-map`: the bridge has no INTx, only MSI(-X).
`dma-coherent`, because the VMM's devices read and write guest RAM through cacheable mappings
(without it Linux would give them non-cacheable buffers and the two views would disagree).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import fdt

from kvmits.gic.regs import MPIDR_AFFINITY_MASK
from kvmits.machine.memmap import UART_SPI, MemoryMap

# Interrupt specifier cells of the arm,gic-v3 binding: <type number flags>.
GIC_SPI = 0
GIC_PPI = 1
IRQ_TYPE_LEVEL_HIGH = 4
# Architected timer PPIs (Arm ARM D11 / the arm,armv8-timer binding order): secure physical,
# non-secure physical, virtual, hypervisor physical -> INTIDs 29, 30, 27, 26.
TIMER_PPIS = (13, 14, 11, 10)
#: the PL011's reference clock as seen by the guest; the model itself has no baud rate
UART_CLOCK_HZ = 24_000_000

PHANDLE_GIC = 1
PHANDLE_ITS = 2
PHANDLE_APB_CLK = 3

# PCI bus binding (IEEE 1275 PCI bus binding, 2.2.1.1): phys.hi of a child address,
# "npt000ss bbbbbbbb dddddfff rrrrrrrr" with ss = 10 for 32-bit memory space
OF_PCI_SPACE_MEM32 = 0x0200_0000
#: requester IDs of bus 0 that msi-map translates
PCI_BUS0_RIDS = 0x100

#: the largest device tree booting.rst allows
MAX_DTB_SIZE = 2 << 20


class Initrd(NamedTuple):
    start: int
    end: int


def _cells64(value: int) -> list[int]:
    return [value >> 32, value & 0xFFFFFFFF]


def _reg(*pairs: tuple[int, int]) -> list[int]:
    """A reg property in #address-cells = #size-cells = 2."""
    out: list[int] = []
    for base, size in pairs:
        out += _cells64(base) + _cells64(size)
    return out


def _node(name: str, *props: tuple[str, object]) -> fdt.Node:
    node = fdt.Node(name)
    for key, value in props:
        node.append(_prop(key, value))
    return node


def _prop(key: str, value: object) -> fdt.Property:
    if value is None:
        return fdt.Property(key)               # an empty (boolean) property
    if isinstance(value, int):
        return fdt.PropWords(key, value)
    if value == "":
        return fdt.PropBytes(key, data=b"\0")   # fdt refuses empty strings; this is dtc's `key = "";`
    if isinstance(value, str):
        return fdt.PropStrings(key, value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return fdt.PropWords(key, *value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return fdt.PropStrings(key, *value)
    raise TypeError(f"property {key}: unsupported value {value!r}")


def uart_node_name(memmap: MemoryMap) -> str:
    return f"pl011@{memmap.uart.base:x}"


def pcie_node_name(memmap: MemoryMap) -> str:
    return f"pcie@{memmap.pcie_ecam.base:x}"


def build_fdt(memmap: MemoryMap, mpidrs: Sequence[int], *, its: bool, bootargs: str = "",
              initrd: Initrd | None = None, pci: bool = False) -> fdt.FDT:
    """The tree as an fdt.FDT. `mpidrs[i]` is vCPU i's MPIDR_EL1 (read from KVM). `pci`: the
    PCIe host bridge, which needs the ITS (its MSIs are its only interrupts)."""
    if len(mpidrs) != memmap.cpus:
        raise ValueError(f"{len(mpidrs)} MPIDRs for {memmap.cpus} vCPUs")
    if pci and not its:
        raise ValueError("a PCIe host bridge needs an ITS: its devices interrupt by MSI only")
    tree = fdt.FDT()
    tree.entries = []                          # fdt.FDT's default is a shared mutable list
    root = tree.root
    for key, value in (("compatible", "linux,dummy-virt"), ("model", "kvmits virt"),
                       ("#address-cells", 2), ("#size-cells", 2), ("interrupt-parent", PHANDLE_GIC)):
        root.append(_prop(key, value))

    # /chosen: bootargs, the console (stdout-path also serves `earlycon` without arguments), initrd
    chosen = _node("chosen", ("bootargs", bootargs), ("stdout-path", "/" + uart_node_name(memmap)))
    if initrd is not None:
        chosen.append(_prop("linux,initrd-start", _cells64(initrd.start)))
        chosen.append(_prop("linux,initrd-end", _cells64(initrd.end)))
    root.append(chosen)

    root.append(_node(f"memory@{memmap.ram.base:x}", ("device_type", "memory"),
                      ("reg", _reg((memmap.ram.base, memmap.ram.size)))))

    # cpus: reg is the MPIDR_EL1 affinity; one cell while Aff3 is 0 (the arm,cpus binding)
    affinities = [m & MPIDR_AFFINITY_MASK for m in mpidrs]
    cells = 2 if any(a >> 32 for a in affinities) else 1
    cpus = _node("cpus", ("#address-cells", cells), ("#size-cells", 0))
    for aff in affinities:
        reg = _cells64(aff) if cells == 2 else aff
        cpus.append(_node(f"cpu@{aff:x}", ("device_type", "cpu"), ("compatible", "arm,armv8"),
                          ("reg", reg), ("enable-method", "psci")))
    root.append(cpus)

    # PSCI 0.2 function IDs are fixed by the spec, so the node needs only the conduit
    root.append(_node("psci", ("compatible", "arm,psci-0.2"), ("method", "hvc")))

    gic = _node(f"intc@{memmap.gicd.base:x}", ("compatible", "arm,gic-v3"), ("#interrupt-cells", 3),
                ("interrupt-controller", None), ("#address-cells", 2), ("#size-cells", 2), ("ranges", None),
                ("reg", _reg((memmap.gicd.base, memmap.gicd.size), (memmap.gicr.base, memmap.gicr.size))),
                ("phandle", PHANDLE_GIC))
    if its:
        gic.append(_node(f"msi-controller@{memmap.its.base:x}", ("compatible", "arm,gic-v3-its"),
                         ("msi-controller", None), ("#msi-cells", 1),
                         ("reg", _reg((memmap.its.base, memmap.its.size))), ("phandle", PHANDLE_ITS)))
    root.append(gic)

    timer_irqs: list[int] = []
    for ppi in TIMER_PPIS:
        timer_irqs += [GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH]
    root.append(_node("timer", ("compatible", "arm,armv8-timer"), ("interrupts", timer_irqs)))

    # Linux's amba-pl011 driver (through the AMBA bus) wants an "apb_pclk" clock and a "uartclk"
    root.append(_node("apb-pclk", ("compatible", "fixed-clock"), ("#clock-cells", 0),
                      ("clock-frequency", UART_CLOCK_HZ), ("clock-output-names", "clk24mhz"),
                      ("phandle", PHANDLE_APB_CLK)))
    root.append(_node(uart_node_name(memmap), ("compatible", ["arm,pl011", "arm,primecell"]),
                      ("reg", _reg((memmap.uart.base, memmap.uart.size))),
                      ("interrupts", [GIC_SPI, UART_SPI, IRQ_TYPE_LEVEL_HIGH]),
                      ("clocks", [PHANDLE_APB_CLK, PHANDLE_APB_CLK]), ("clock-names", ["uartclk", "apb_pclk"])))
    if pci:
        ecam, mmio = memmap.pcie_ecam, memmap.pcie_mmio
        root.append(_node(pcie_node_name(memmap), ("compatible", "pci-host-ecam-generic"), ("device_type", "pci"),
                          ("#address-cells", 3), ("#size-cells", 2), ("linux,pci-domain", 0),
                          ("bus-range", [0, 0]), ("dma-coherent", None),
                          ("reg", _reg((ecam.base, ecam.size))),
                          # <child address (3 cells)> <parent address (2)> <size (2)>, identity-mapped
                          ("ranges", [OF_PCI_SPACE_MEM32, *_cells64(mmio.base), *_cells64(mmio.base),
                                      *_cells64(mmio.size)]),
                          ("msi-map", [0, PHANDLE_ITS, 0, PCI_BUS0_RIDS])))
    return tree


def build_dtb(memmap: MemoryMap, mpidrs: Sequence[int], *, its: bool, bootargs: str = "",
              initrd: Initrd | None = None, pci: bool = False) -> bytes:
    """The flattened device tree blob (version 17) for this machine."""
    blob = build_fdt(memmap, mpidrs, its=its, bootargs=bootargs, initrd=initrd, pci=pci).to_dtb(version=17)
    if len(blob) > MAX_DTB_SIZE:
        raise ValueError(f"device tree of {len(blob)} bytes exceeds booting.rst's 2 MiB")
    return blob
