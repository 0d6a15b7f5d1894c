"""A PCIe host bridge: ECAM configuration space for bus 0, and the BARs of its functions mapped
on the MMIO bus where software programs them.

ECAM (PCIe Base 4.0, 7.2.2, "PCI Express Enhanced Configuration Access Mechanism"): function
(bus, device, function)'s 4 KiB of configuration space is at offset bus << 20 | device << 15 |
function << 12 of the window. Linux's pci-host-ecam-generic driver finds it from the device
tree (`reg`) and assigns BARs itself inside the window of `ranges` (drivers/pci/setup-bus.c),
so the bridge must follow wherever a BAR is moved.

What a guest may do, and what happens:
- access a function that does not exist: reads are all ones (what a PCI host reports for a
  master abort, and how software enumerates), writes are dropped;
- access any width at any offset: the function's ConfigSpace takes it; 8-byte accesses are two
  4-byte ones;
- enable memory decoding with a BAR outside the MMIO window, over another BAR, or over any
  other device: that BAR is not mapped (its accesses hit nothing), the case is logged once per
  BAR and counted (`bar_refusals`); moving it to a free place later maps it.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from kvmits.machine.pci.config import (CONFIG_SPACE_SIZE, PCI_BASE_ADDRESS_0, PCI_COMMAND, PCI_COMMAND_MEMORY,
                                       PCI_NUM_BARS, ConfigSpace)

log = logging.getLogger(__name__)

ECAM_BUS_SHIFT = 20
ECAM_DEVICE_SHIFT = 15
ECAM_FUNCTION_SHIFT = 12
ECAM_BUS_SIZE = 1 << ECAM_BUS_SHIFT      # 32 devices x 8 functions x 4 KiB
PCI_MAX_DEVICES = 32


class PciFunction(Protocol):
    """What the bridge needs of a function: its config space and the MMIO of its BARs."""

    config: ConfigSpace

    def bar_read(self, vcpu: int, bar: int, offset: int, size: int) -> int: ...

    def bar_write(self, vcpu: int, bar: int, offset: int, size: int, value: int) -> None: ...


class _BarWindow:
    """One BAR of one function as an MMIO bus device."""

    def __init__(self, function: PciFunction, index: int):
        self.function = function
        self.index = index

    def mmio_read(self, vcpu: int, offset: int, size: int) -> int:
        return self.function.bar_read(vcpu, self.index, offset, size)

    def mmio_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        self.function.bar_write(vcpu, self.index, offset, size, value)


class PciHost:
    """Bus 0 of an ECAM window (an MMIO device of ECAM_BUS_SIZE bytes) and its functions' BARs
    on `bus` (a kvmits.machine.bus.MmioBus) inside [mmio_base, mmio_base + mmio_size)."""

    def __init__(self, bus, mmio_base: int, mmio_size: int):
        self.bus = bus
        self.mmio_base = mmio_base
        self.mmio_end = mmio_base + mmio_size
        self.functions: dict[int, PciFunction] = {}         # devfn -> function
        self._on_bar: dict[int, Callable[[int, int | None], None]] = {}
        self._mapped: dict[tuple[int, int], tuple[int, _BarWindow]] = {}   # (devfn, bar) -> (address, window)
        self._refused_logged: set[tuple[int, int, int]] = set()
        #: BAR placements refused (outside the window, or overlapping): guest mistakes
        self.bar_refusals = 0

    def add(self, device: int, function: PciFunction, fn: int = 0,
            on_bar: Callable[[int, int | None], None] | None = None) -> int:
        """Put `function` at bus 0, device `device`, function `fn`; returns its devfn, which is
        also its requester ID on bus 0 (the ITS DeviceID under `msi-map`). `on_bar(bar,
        address)` is told whenever one of its BARs starts decoding at `address` or stops
        (None): what a VMM needs to move ioeventfds with a BAR."""
        if not 0 <= device < PCI_MAX_DEVICES or not 0 <= fn < 8:
            raise ValueError(f"no such slot: device {device}, function {fn}")
        devfn = device << 3 | fn
        if devfn in self.functions:
            raise ValueError(f"slot {device}.{fn} is taken")
        self.functions[devfn] = function
        if on_bar is not None:
            self._on_bar[devfn] = on_bar
        update = lambda devfn=devfn: self._update_bars(devfn)      # noqa: E731
        function.config.watch(PCI_COMMAND, 2, update)
        function.config.watch(PCI_BASE_ADDRESS_0, 4 * PCI_NUM_BARS, update)
        return devfn

    # -- the ECAM window (MmioDevice) ---------------------------------------------------------------
    def mmio_read(self, vcpu: int, offset: int, size: int) -> int:
        if size == 8:
            return self.mmio_read(vcpu, offset, 4) | self.mmio_read(vcpu, offset + 4, 4) << 32
        function = self._function(offset)
        if function is None:
            return (1 << (8 * size)) - 1
        return function.config.read(offset & (CONFIG_SPACE_SIZE - 1), size)

    def mmio_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.mmio_write(vcpu, offset, 4, value & 0xFFFF_FFFF)
            self.mmio_write(vcpu, offset + 4, 4, value >> 32)
            return
        function = self._function(offset)
        if function is not None:
            function.config.write(offset & (CONFIG_SPACE_SIZE - 1), size, value)

    def _function(self, offset: int) -> PciFunction | None:
        if offset >> ECAM_BUS_SHIFT:
            return None                                    # only bus 0 exists
        return self.functions.get(offset >> ECAM_FUNCTION_SHIFT)

    # -- BAR decoding -------------------------------------------------------------------------------
    def _update_bars(self, devfn: int) -> None:
        """Map each BAR of `devfn` where its register says, while memory decoding is enabled."""
        config = self.functions[devfn].config
        decoding = bool(config.command & PCI_COMMAND_MEMORY)
        for index, bar in config.bars.items():
            key = (devfn, index)
            address = config.bar_address(index) if decoding else None
            current = self._mapped.get(key)
            if current is not None and current[0] == address:
                continue
            on_bar = self._on_bar.get(devfn)
            if current is not None:
                self.bus.remove(current[1])
                del self._mapped[key]
                if on_bar is not None:
                    on_bar(index, None)
            if address is None:
                continue
            if not (self.mmio_base <= address and address + bar.size <= self.mmio_end):
                self._refuse(devfn, index, address, f"outside the MMIO window [{self.mmio_base:#x}, {self.mmio_end:#x})")
                continue
            window = _BarWindow(self.functions[devfn], index)
            try:
                self.bus.add(address, bar.size, window, f"pci {devfn >> 3:02x}.{devfn & 7} BAR{index}")
            except ValueError as exc:                      # over another BAR or device
                self._refuse(devfn, index, address, str(exc))
                continue
            self._mapped[key] = (address, window)
            if on_bar is not None:
                on_bar(index, address)

    def reload(self, devfn: int) -> None:
        """Map `devfn`'s BARs as its config space says now: after ConfigSpace.load_state, which
        calls no watch (a restore, issue 13)."""
        self._update_bars(devfn)

    def _refuse(self, devfn: int, index: int, address: int, why: str) -> None:
        self.bar_refusals += 1
        if (devfn, index, address) not in self._refused_logged:
            self._refused_logged.add((devfn, index, address))
            log.warning("PCI %02x.%d BAR%d at %#x not mapped: %s", devfn >> 3, devfn & 7, index, address, why)

    def mapped_bars(self) -> dict[tuple[int, int], int]:
        """(devfn, BAR) -> the address it decodes at now."""
        return {key: address for key, (address, _) in self._mapped.items()}
