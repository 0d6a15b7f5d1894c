"""A GICv3 LPI + ITS driver that runs *through the guest*: the driver logic is Python on the
host, every register access is a load or store the guest's own vCPU performs (through the guest
agent, kvmits.machine.agent), and the ITS tables, the command queue and the LPI property and
pending tables live in guest RAM.

So the ITS under test (the kernel's, or kvmits' userspace model) sees exactly what a guest
driver would make it see: register accesses from a vCPU, commands read from guest memory. The
one shortcut: bytes of guest RAM (command slots, LPI property bytes, zeroed tables) are written by
the host through the same mapping the guest uses, which no device can tell from a guest store;
the guest then performs the register write that publishes them (GITS_CWRITER, INV, ...).

The steps follow the GICv3 architecture (Arm IHI 0069): 5.1 LPIs (GICR_PROPBASER, GICR_PENDBASER,
GICR_CTLR.EnableLPIs), 5.2 the ITS (GITS_BASER<n>, GITS_CBASER, GITS_CWRITER/CREADR, GITS_CTLR),
5.3 the ITS commands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from kvmits.gic.regs import GICR_CTLR, GICR_PENDBASER, GICR_PROPBASER, GICR_TYPER
from kvmits.its.registers import (GITS_BASER, GITS_BASER_ENTRY_SIZE_MASK, GITS_BASER_ENTRY_SIZE_SHIFT,
                                  GITS_BASER_INDIRECT, GITS_BASER_PAGE_SIZE_MASK, GITS_BASER_PAGE_SIZE_SHIFT,
                                  GITS_BASER_TYPE_DEVICE, GITS_BASER_TYPE_MASK, GITS_BASER_TYPE_NONE,
                                  GITS_BASER_TYPE_SHIFT, GITS_BASER_VALID, GITS_CBASER, GITS_CBASER_VALID, GITS_CREADR,
                                  GITS_CREADR_STALLED, GITS_CTLR, GITS_CTLR_ENABLED, GITS_CTLR_QUIESCENT,
                                  GITS_CWRITER, GITS_IIDR, GITS_TRANSLATER, GITS_TYPER, LPI_BASE, PAGE_64K,
                                  PAGE_SIZE_DECODING)
from kvmits.its import commands as cmd


# Cacheability/shareability attributes a Linux guest asks for: Inner/Outer write-back
# read/write-allocate (0b111 / 0b000 = same as inner), Inner Shareable.
BASER_ATTRS = (0b111 << 59) | (0b01 << 10)
CBASER_ATTRS = (0b111 << 59) | (0b01 << 10)
GICR_BASER_ATTRS = (0b111 << 7) | (0b01 << 10)         # GICR_PROPBASER/PENDBASER InnerCache, Shareability
GICR_PENDBASER_PTZ = 1 << 62
GICR_CTLR_ENABLE_LPIS = 1
GICR_TYPER_PLPIS = 1
LPI_PROP_ENABLE = 1
DEFAULT_PRIORITY = 0xA0


class GuestAccess(Protocol):
    """Loads and stores performed by a guest vCPU (e.g. an AgentClient bound to one vCPU)."""

    def read(self, addr: int, width: int) -> int: ...

    def write(self, addr: int, width: int, value: int) -> None: ...


class DriverError(RuntimeError):
    """The device did not do what the architecture says a driver can rely on."""


class GuestHeap:
    """A bump allocator over a range of guest RAM the guest program leaves alone; every
    allocation is zeroed (GICR_PENDBASER.PTZ and the ITS tables rely on zeroed memory)."""

    def __init__(self, ram, base: int, end: int):
        self.ram = ram
        self.next = base
        self.end = end

    def alloc(self, size: int, align: int = PAGE_64K) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"guest heap exhausted: {size:#x} bytes at {addr:#x}, heap ends at {self.end:#x}")
        self.next = addr + size
        self.ram.fill(addr, size, 0)
        return addr


class GuestGic:
    """The LPI half of a GICv3 driver: the property table (one, shared) and a pending table
    per redistributor, then EnableLPIs (IHI 0069 5.1.1)."""

    def __init__(self, access: GuestAccess, ram, heap: GuestHeap, gicr_base: Callable[[int], int], cpus: int,
                 id_bits: int = 16):
        self.access = access
        self.ram = ram
        self.heap = heap
        self.gicr_base = gicr_base
        self.cpus = cpus
        self.id_bits = id_bits
        self.prop_table: int | None = None
        self.pend_tables: dict[int, int] = {}

    @property
    def lpi_limit(self) -> int:
        """Exclusive bound of the LPI INTIDs this configuration covers."""
        return 1 << self.id_bits

    def lpis_supported(self, cpu: int = 0) -> bool:
        return bool(self.access.read(self.gicr_base(cpu) + GICR_TYPER, 8) & GICR_TYPER_PLPIS)

    def enable_lpis(self, priority: int = DEFAULT_PRIORITY, enabled: bool = False) -> None:
        """Allocate and program the tables on every redistributor, set EnableLPIs, check it stuck.
        Every LPI starts with `priority` and disabled unless `enabled`."""
        if not self.lpis_supported():
            raise DriverError("GICR_TYPER.PLPIS is 0: no LPI support (on KVM: no in-kernel ITS in this VM)")
        prop_size = self.lpi_limit - LPI_BASE                       # one byte per LPI (5.1.1)
        self.prop_table = self.heap.alloc(prop_size, 0x1000)
        self.ram.fill(self.prop_table, prop_size, (priority & 0xFC) | (LPI_PROP_ENABLE if enabled else 0))
        for cpu in range(self.cpus):
            pend = self.heap.alloc(self.lpi_limit // 8, PAGE_64K)    # one bit per INTID, 64 KiB aligned
            self.pend_tables[cpu] = pend
            rd = self.gicr_base(cpu)
            self.access.write(rd + GICR_PROPBASER, 8, self.prop_table | GICR_BASER_ATTRS | (self.id_bits - 1))
            self.access.write(rd + GICR_PENDBASER, 8, pend | GICR_BASER_ATTRS | GICR_PENDBASER_PTZ)
            ctlr = self.access.read(rd + GICR_CTLR, 4)
            self.access.write(rd + GICR_CTLR, 4, ctlr | GICR_CTLR_ENABLE_LPIS)
            if not self.access.read(rd + GICR_CTLR, 4) & GICR_CTLR_ENABLE_LPIS:
                raise DriverError(f"GICR_CTLR.EnableLPIs did not stick on vCPU {cpu}'s redistributor")

    def set_lpi_config(self, intid: int, enabled: bool = True, priority: int = DEFAULT_PRIORITY) -> None:
        """Write LPI `intid`'s property byte. The ITS/redistributor may cache it: follow with an
        ITS INV (or INVALL) for the change to take effect (IHI 0069 5.1.1)."""
        if self.prop_table is None:
            raise DriverError("enable_lpis() first")
        if not LPI_BASE <= intid < self.lpi_limit:
            raise ValueError(f"INTID {intid} is not an LPI of this configuration")
        self.ram.write(self.prop_table + intid - LPI_BASE, bytes([(priority & 0xFC) | (LPI_PROP_ENABLE if enabled else 0)]))

    def lpi_config(self, intid: int) -> int:
        return self.ram.read(self.prop_table + intid - LPI_BASE, 1)[0]


@dataclass
class ItsTable:
    """One GITS_BASER<n> as the driver programmed it."""

    index: int
    type: int
    entry_size: int
    page_size: int
    base: int
    pages: int
    indirect: bool
    level2: dict[int, int] = field(default_factory=dict)    # level-1 index -> level-2 page address


@dataclass
class ItsDevice:
    devid: int
    event_bits: int
    itt: int


class GuestIts:
    """An ITS driver: tables, command queue and the commands, in the guest (IHI 0069 5.2, 5.3)."""

    def __init__(self, access: GuestAccess, ram, heap: GuestHeap, base: int, queue_size: int = PAGE_64K):
        if queue_size % 0x1000 or not 0x1000 <= queue_size <= 256 * 0x1000:
            raise ValueError("the command queue is 1..256 pages of 4 KiB (GITS_CBASER.Size)")
        self.access = access
        self.ram = ram
        self.heap = heap
        self.base = base
        self.queue_size = queue_size
        self.queue: int | None = None
        self.cwriter = 0
        self.tables: dict[int, ItsTable] = {}
        self.devices: dict[int, ItsDevice] = {}
        self.typer = 0
        self.commands_sent = 0

    # -- registers ---------------------------------------------------------------------------
    def read_reg(self, offset: int, width: int = 8) -> int:
        return self.access.read(self.base + offset, width)

    def write_reg(self, offset: int, value: int, width: int = 8) -> None:
        self.access.write(self.base + offset, width, value)

    @property
    def doorbell(self) -> int:
        """GITS_TRANSLATER: the address a device writes its EventID to."""
        return self.base + GITS_TRANSLATER

    def identify(self) -> dict:
        """GITS_IIDR, GITS_TYPER and the BASER<n> read-only fields, as the guest reads them."""
        self.typer = self.read_reg(GITS_TYPER)
        out = {"GITS_IIDR": self.read_reg(GITS_IIDR, 4), "GITS_TYPER": self.typer,
               "GITS_CTLR": self.read_reg(GITS_CTLR, 4), "baser": []}
        for n in range(8):
            value = self.read_reg(GITS_BASER(n))
            out["baser"].append({"n": n, "value": value, "type": (value >> GITS_BASER_TYPE_SHIFT) & 7,
                                 "entry_size": ((value >> GITS_BASER_ENTRY_SIZE_SHIFT) & 0x1F) + 1,
                                 "page_size": PAGE_SIZE_DECODING[(value >> GITS_BASER_PAGE_SIZE_SHIFT) & 3]})
        return out

    @property
    def device_bits(self) -> int:
        return ((self.typer >> 13) & 0x1F) + 1            # GITS_TYPER.Devbits

    @property
    def itt_entry_size(self) -> int:
        return ((self.typer >> 4) & 0xF) + 1              # GITS_TYPER.ITT_entry_size

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, device_pages: int = 1, collection_pages: int = 1, two_level: bool = False) -> None:
        """Allocate the device and collection tables and the command queue, program
        GITS_BASER<n> and GITS_CBASER, then enable the ITS (5.2.1: tables before Enabled)."""
        ident = self.identify()
        for b in ident["baser"]:
            if b["type"] == GITS_BASER_TYPE_NONE:
                continue
            pages = device_pages if b["type"] == GITS_BASER_TYPE_DEVICE else collection_pages
            indirect = two_level and b["type"] == GITS_BASER_TYPE_DEVICE
            page = b["page_size"]
            addr = self.heap.alloc(pages * page, max(page, PAGE_64K))
            value = (GITS_BASER_VALID | (GITS_BASER_INDIRECT if indirect else 0) | BASER_ATTRS
                     | (b["value"] & (GITS_BASER_TYPE_MASK | GITS_BASER_ENTRY_SIZE_MASK | GITS_BASER_PAGE_SIZE_MASK))
                     | _baser_address(addr, page) | (pages - 1))
            self.write_reg(GITS_BASER(b["n"]), value)
            back = self.read_reg(GITS_BASER(b["n"]))
            if not back & GITS_BASER_VALID:
                raise DriverError(f"GITS_BASER{b['n']} did not take {value:#x} (reads {back:#x})")
            self.tables[b["type"]] = ItsTable(b["n"], b["type"], b["entry_size"], page, addr, pages,
                                              bool(back & GITS_BASER_INDIRECT))
        self.queue = self.heap.alloc(self.queue_size, PAGE_64K)
        self.write_reg(GITS_CBASER, GITS_CBASER_VALID | CBASER_ATTRS | self.queue | (self.queue_size // 0x1000 - 1))
        self.write_reg(GITS_CWRITER, 0)
        self.cwriter = 0
        self.write_reg(GITS_CTLR, GITS_CTLR_ENABLED, 4)
        if not self.read_reg(GITS_CTLR, 4) & GITS_CTLR_ENABLED:
            raise DriverError("GITS_CTLR.Enabled did not stick (tables or queue not accepted)")

    # -- the command queue -------------------------------------------------------------------
    def submit(self, *commands: bytes, timeout: float = 10.0) -> int:
        """Queue `commands` (32 bytes each), publish them with one GITS_CWRITER write and wait
        until GITS_CREADR has consumed them. Returns the final GITS_CREADR."""
        if self.queue is None:
            raise DriverError("setup() first")
        if len(commands) * 32 >= self.queue_size:
            raise ValueError("more commands than the queue holds")
        for c in commands:
            self.ram.write(self.queue + self.cwriter, c)
            self.cwriter = (self.cwriter + 32) % self.queue_size
        self.write_reg(GITS_CWRITER, self.cwriter)
        self.commands_sent += len(commands)
        deadline = time.monotonic() + timeout
        while True:
            creadr = self.read_reg(GITS_CREADR)
            if creadr & GITS_CREADR_STALLED:
                raise DriverError(f"the ITS stalled on a command error (GITS_CREADR={creadr:#x})")
            if (creadr & 0xFFFE0) == self.cwriter:
                return creadr
            if time.monotonic() > deadline:
                raise DriverError(f"GITS_CREADR stuck at {creadr:#x}, GITS_CWRITER is {self.cwriter:#x}")

    # -- commands (each followed by what a driver needs to know it is done: SYNC where the
    #    redistributor side matters) -----------------------------------------------------------
    def mapc(self, icid: int, cpu: int, valid: bool = True) -> None:
        """MAPC ICID -> vCPU `cpu` (GITS_TYPER.PTA = 0: RDbase is the processor number)."""
        self.submit(cmd.encode_mapc(icid, cpu, valid), cmd.encode_sync(cpu))

    def mapd(self, devid: int, event_bits: int, valid: bool = True) -> ItsDevice | None:
        """MAPD with a fresh ITT for 2**event_bits events (V=0 unmaps the device)."""
        if not valid:
            self.submit(cmd.encode_mapd(devid, 0, 1, valid=False))
            self.devices.pop(devid, None)
            return None
        self._ensure_level2(devid)
        itt = self.heap.alloc(max((1 << event_bits) * self.itt_entry_size, 256), 256)
        self.submit(cmd.encode_mapd(devid, itt, event_bits))
        dev = ItsDevice(devid, event_bits, itt)
        self.devices[devid] = dev
        return dev

    def _ensure_level2(self, devid: int) -> None:
        """Two-level device table: make the level-1 entry covering `devid` Valid (5.2.2)."""
        table = self.tables.get(GITS_BASER_TYPE_DEVICE)
        if table is None or not table.indirect:
            return
        per_page = table.page_size // table.entry_size
        index = devid // per_page
        if index in table.level2 or index >= table.pages * table.page_size // 8:
            return
        page = self.heap.alloc(table.page_size, table.page_size)
        self.ram.write_u64(table.base + 8 * index, page | GITS_BASER_VALID)
        table.level2[index] = page

    def mapti(self, devid: int, eventid: int, intid: int, icid: int) -> None:
        self.submit(cmd.encode_mapti(devid, eventid, intid, icid))

    def mapi(self, devid: int, eventid: int, icid: int) -> None:
        self.submit(cmd.encode_mapi(devid, eventid, icid))

    def movi(self, devid: int, eventid: int, icid: int) -> None:
        self.submit(cmd.encode_movi(devid, eventid, icid))

    def movall(self, from_cpu: int, to_cpu: int) -> None:
        self.submit(cmd.encode_movall(from_cpu, to_cpu), cmd.encode_sync(to_cpu))

    def int_(self, devid: int, eventid: int) -> None:
        """INT: make the LPI that (devid, eventid) translates to pending, as an MSI would."""
        self.submit(cmd.encode_int(devid, eventid))

    def clear(self, devid: int, eventid: int) -> None:
        self.submit(cmd.encode_clear(devid, eventid))

    def inv(self, devid: int, eventid: int) -> None:
        self.submit(cmd.encode_inv(devid, eventid))

    def invall(self, icid: int) -> None:
        self.submit(cmd.encode_invall(icid))

    def discard(self, devid: int, eventid: int) -> None:
        self.submit(cmd.encode_discard(devid, eventid))

    def sync(self, cpu: int) -> None:
        self.submit(cmd.encode_sync(cpu))


def _baser_address(addr: int, page_size: int) -> int:
    """The Physical_Address field of GITS_BASER<n>: with 64 KiB pages, PA[47:16] sits in bits
    [47:16] and PA[51:48] in bits [15:12] (IHI 0069 12.19.1)."""
    if page_size == PAGE_64K:
        return (addr & 0x0000_FFFF_FFFF_0000) | ((addr >> 48) & 0xF) << 12
    return addr & 0x0000_FFFF_FFFF_F000
