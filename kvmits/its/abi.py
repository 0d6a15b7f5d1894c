"""The in-kernel ITS's table layout in guest memory: KVM ITS table ABI revision 0.

Linux Documentation/virt/kvm/devices/arm-vgic-its.rst ("ITS Table ABI REV0") defines what
KVM_DEV_ARM_ITS_SAVE_TABLES writes and KVM_DEV_ARM_ITS_RESTORE_TABLES reads. Every entry is
8 bytes, little endian:

    DTE  [63] V   [62:49] next   [48:5] ITT_addr[51:8]   [4:0] Size (EventID bits - 1)
    CTE  [63] V   [62:52] RES0   [51:16] RDBase          [15:0] ICID
    ITE  [63:48] next            [47:16] pINTID (0: no entry)   [15:0] ICID

The device table is indexed by DeviceID (flat, or two-level through level-1 entries whose
bit 63 is Valid), each ITT by EventID. The collection table is *not* indexed: its entries are
packed in no particular order and end at the first entry with V = 0 (or the table's end).
`next` is the ID distance to the next valid entry (0: this is the last), capped at 2^14 - 1
(DTE) or 2^16 - 1 (ITE); a reader steps one entry at a time over invalid entries. A
collection that ITEs name but that has no target is saved with RDBase = 0xFFFFFFFF.

This module encodes and decodes entries, finds an ID's entry in a (two-level) table, writes
a mapping dump as tables, and reads tables back into the canonical dump of
`ItsModel.dump()` -- which also decodes what the *kernel's* ITS saved.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmits.errors import GuestMemoryError, KvmitsError
from kvmits.its.registers import (
    GITS_BASER_TYPE_COLLECTION, GITS_BASER_TYPE_DEVICE, LPI_BASE, TableGeometry, decode_baser,
)

ABI_REV0_ENTRY_SIZE = 8
COLLECTION_NOT_MAPPED = 0xFFFF_FFFF
DTE_MAX_NEXT = (1 << 14) - 1
ITE_MAX_NEXT = (1 << 16) - 1
L1_ENTRY_SIZE = 8
_ADDR52 = (1 << 52) - 1

#: Default bound on the table entries one decode may read (a hostile table can make a walk
#: long: 2^16 devices x 2^16 EventIDs).
DEFAULT_MAX_ENTRIES = 1 << 22


class ItsTableError(KvmitsError):
    """Tables in guest memory cannot be written or read back (what makes KVM's
    KVM_DEV_ARM_ITS_SAVE_TABLES / RESTORE_TABLES fail with EINVAL or EFAULT)."""


# -- entries -------------------------------------------------------------------------------
class Dte(NamedTuple):
    valid: bool
    next: int
    itt_addr: int
    size_bits: int      # EventID bits (the field holds this minus one)


class Cte(NamedTuple):
    valid: bool
    rdbase: int
    icid: int


class Ite(NamedTuple):
    next: int
    intid: int          # 0: not a valid entry
    icid: int


def encode_dte(itt_addr: int, size_bits: int, next_: int = 0, valid: bool = True) -> int:
    return (((1 << 63) if valid else 0) | ((next_ & DTE_MAX_NEXT) << 49)
            | (((itt_addr >> 8) & ((1 << 44) - 1)) << 5) | ((size_bits - 1) & 0x1F))


def decode_dte(value: int) -> Dte:
    return Dte(bool(value >> 63), (value >> 49) & DTE_MAX_NEXT,
               ((value >> 5) & ((1 << 44) - 1)) << 8, (value & 0x1F) + 1)


def encode_cte(icid: int, rdbase: int, valid: bool = True) -> int:
    # KVM stores the 32-bit vCPU number (or COLLECTION_NOT_MAPPED) from bit 16.
    return ((1 << 63) if valid else 0) | ((rdbase & 0xFFFF_FFFF) << 16) | (icid & 0xFFFF)


def decode_cte(value: int) -> Cte:
    return Cte(bool(value >> 63), (value >> 16) & 0xFFFF_FFFF, value & 0xFFFF)


def encode_ite(intid: int, icid: int, next_: int = 0) -> int:
    return ((next_ & ITE_MAX_NEXT) << 48) | ((intid & 0xFFFF_FFFF) << 16) | (icid & 0xFFFF)


def decode_ite(value: int) -> Ite:
    return Ite(value >> 48, (value >> 16) & 0xFFFF_FFFF, value & 0xFFFF)


def encode_l1_entry(l2_addr: int, valid: bool = True) -> int:
    return ((1 << 63) if valid else 0) | (l2_addr & _ADDR52)


def _u64(mem, gpa: int) -> int:
    return int.from_bytes(mem.read(gpa, 8), "little")


# -- finding an entry ----------------------------------------------------------------------
def table_entry_address(mem, geometry: TableGeometry, ident: int, id_bits: int) -> int | None:
    """Guest-physical address of the entry for `ident` in a GITS_BASER<n> table, or None.

    None when the ID has more than `id_bits` bits, is beyond the table, its level-1 entry is
    not Valid or not readable, or the entry itself is not in guest RAM (KVM checks that the
    entry's page is backed: kvm_is_visible_gfn). The level-1 entry is read from guest memory
    now, as KVM does at command time.
    """
    if ident >> id_bits or not geometry.valid:
        return None
    esz = geometry.entry_size
    if not geometry.indirect:
        if ident >= geometry.size // esz:
            return None
        addr = geometry.base + ident * esz
    else:
        per_page = geometry.page_size // esz
        index = ident // per_page
        if index >= geometry.size // L1_ENTRY_SIZE:
            return None
        try:
            l1 = _u64(mem, geometry.base + index * L1_ENTRY_SIZE)
        except GuestMemoryError:
            return None
        if not l1 >> 63:
            return None
        addr = (l1 & _ADDR52 & ~(geometry.page_size - 1)) + (ident % per_page) * esz
    try:
        mem.read(addr, esz)
    except GuestMemoryError:
        return None
    return addr


# -- the canonical dump ----------------------------------------------------------------------
def canonical_dump(devices: dict, collections: dict) -> dict:
    """Normalise a mapping dump: int values, keys sorted at every level.

    `devices`: {devid: {"itt_addr", "size_bits", "events": {eventid: {"intid", "icid"}}}}
    (`size_bits` is the number of EventID bits, MAPD's Size + 1); `collections`:
    {icid: target vCPU}. Dumps of the same state compare equal.
    """
    out_devices = {}
    for devid in sorted(devices):
        dev = devices[devid]
        events = dev["events"]
        out_devices[int(devid)] = {
            "events": {int(e): {"icid": int(events[e]["icid"]), "intid": int(events[e]["intid"])}
                       for e in sorted(events, key=int)},
            "itt_addr": int(dev["itt_addr"]),
            "size_bits": int(dev["size_bits"]),
        }
    return {
        "collections": {int(i): int(collections[i]) for i in sorted(collections, key=int)},
        "devices": out_devices,
    }


class TablesContent(NamedTuple):
    """What a table walk found: the canonical dump plus the collections without a target."""

    dump: dict
    unmapped_collections: tuple[int, ...]


# -- writing tables (KVM_DEV_ARM_ITS_SAVE_TABLES) --------------------------------------------
def write_tables(mem, baser0: int, baser1: int, dump: dict,
                 unmapped_collections=(), *, devbits: int = 16, invalid_ites=()) -> int:
    """Write a canonical dump into the guest tables GITS_BASER0/1 describe; bytes written.

    Like the kernel: a table whose BASER is not Valid is skipped; only valid entries are
    written (the guest zeroed its tables), plus one invalid collection entry that ends the
    packed collection list when it does not fill the table. `unmapped_collections` are ICIDs
    saved with RDBase = COLLECTION_NOT_MAPPED; ICIDs named by ITEs but absent from both are
    added to them, so the kernel's restore finds every ITE's collection.

    `invalid_ites`: (DeviceID, EventID) pairs of the dump whose ITE is written as an invalid
    (all-zero) entry, still counted in the `next` chain: what the kernel writes for an ITE
    whose collection was unmapped (MAPC V=0 leaves it with no collection; vgic_its_save_ite
    then stores 0 -- seen on the testbed's Debian 6.1 kernel). Their ICIDs are not added to
    the collection table. A restore steps over such entries: the ITE does not come back.
    """
    invalid = set(invalid_ites)
    dt, ct = decode_baser(baser0), decode_baser(baser1)
    written = 0
    devices = dump["devices"]
    collections = dump["collections"]
    if dt.valid:
        if dt.type != GITS_BASER_TYPE_DEVICE or dt.entry_size != ABI_REV0_ENTRY_SIZE:
            raise ItsTableError(f"GITS_BASER0 does not describe an 8-byte device table: {baser0:#x}")
        ordered = sorted(devices)
        for pos, devid in enumerate(ordered):
            dev = devices[devid]
            addr = table_entry_address(mem, dt, devid, devbits)
            if addr is None:
                raise ItsTableError(f"DeviceID {devid:#x} has no entry in the device table "
                                    f"(beyond it, level-1 entry not Valid, or not in RAM)")
            events = dev["events"]
            eids = sorted(events)
            for epos, eid in enumerate(eids):
                nxt = min(eids[epos + 1] - eid, ITE_MAX_NEXT) if epos + 1 < len(eids) else 0
                ite = events[eid]
                value = 0 if (devid, eid) in invalid else encode_ite(ite["intid"], ite["icid"], nxt)
                _write_u64(mem, dev["itt_addr"] + eid * ABI_REV0_ENTRY_SIZE, value)
                written += 8
            nxt = min(ordered[pos + 1] - devid, DTE_MAX_NEXT) if pos + 1 < len(ordered) else 0
            _write_u64(mem, addr, encode_dte(dev["itt_addr"], dev["size_bits"], nxt))
            written += 8
    if ct.valid:
        if ct.type != GITS_BASER_TYPE_COLLECTION or ct.entry_size != ABI_REV0_ENTRY_SIZE:
            raise ItsTableError(f"GITS_BASER1 does not describe an 8-byte collection table: {baser1:#x}")
        if ct.indirect:
            raise ItsTableError("ABI rev 0 has no two-level collection table")
        unmapped = set(unmapped_collections)
        for devid, dev in devices.items():
            for eid, ite in dev["events"].items():
                if ite["icid"] not in collections and (devid, eid) not in invalid:
                    unmapped.add(ite["icid"])
        unmapped -= set(collections)
        entries = [encode_cte(i, t) for i, t in sorted(collections.items())]
        entries += [encode_cte(i, COLLECTION_NOT_MAPPED) for i in sorted(unmapped)]
        capacity = ct.size // ABI_REV0_ENTRY_SIZE
        if len(entries) > capacity:
            raise ItsTableError(f"{len(entries)} collections do not fit a {capacity}-entry table")
        if len(entries) < capacity:
            entries.append(0)
        _write_block(mem, ct.base, entries)
        written += 8 * len(entries)
    return written


def _write_u64(mem, gpa: int, value: int) -> None:
    try:
        mem.write(gpa, value.to_bytes(8, "little"))
    except GuestMemoryError as exc:
        raise ItsTableError(f"table entry at {gpa:#x} is not in guest RAM") from exc


def _write_block(mem, gpa: int, values: list[int]) -> None:
    data = b"".join(v.to_bytes(8, "little") for v in values)
    try:
        mem.write(gpa, data)
    except GuestMemoryError as exc:
        raise ItsTableError(f"table at {gpa:#x} (+{len(data)} B) is not in guest RAM") from exc


# -- reading tables (KVM_DEV_ARM_ITS_RESTORE_TABLES) -----------------------------------------
class _Reader:
    """Reads 8-byte entries through a one-page cache, and counts them against a budget."""

    __slots__ = ("mem", "budget", "page", "data")

    def __init__(self, mem, budget: int):
        self.mem = mem
        self.budget = budget
        self.page = -1
        self.data = b""

    def u64(self, gpa: int) -> int:
        self.budget -= 1
        if self.budget < 0:
            raise ItsTableError("table walk exceeded its entry budget (max_entries)")
        page = gpa & ~0xFFF
        if page != self.page:
            try:
                self.data = self.mem.read(page, 4096)
                self.page = page
            except GuestMemoryError:
                # RAM may end inside this page: fall back to the entry alone.
                try:
                    return int.from_bytes(self.mem.read(gpa, 8), "little")
                except GuestMemoryError as exc:
                    raise ItsTableError(f"table entry at {gpa:#x} is not in guest RAM") from exc
        off = gpa - page
        return int.from_bytes(self.data[off:off + 8], "little")


def _scan(reader: _Reader, base: int, size: int, start_id: int, fn) -> int:
    """Walk a contiguous table the way KVM's scan_its_table does.

    `fn(id, value)` returns < 0 (error), 0 (that was the last entry), or how many entries to
    step. Returns 0 if the last entry was found, 1 if the table ended first. A step that
    leaves the table ends the walk (the kernel's older loop did the same).
    """
    ident, gpa, left = start_id, base, size
    while left > 0:
        step = fn(ident, reader.u64(gpa))
        if step <= 0:
            return step
        nbytes = step * ABI_REV0_ENTRY_SIZE
        if nbytes >= left:
            break
        ident += step
        gpa += nbytes
        left -= nbytes
    return 1


def read_tables(mem, baser0: int, baser1: int, *, nr_vcpus: int | None = None,
                max_entries: int = DEFAULT_MAX_ENTRIES, devbits: int | None = None,
                idbits: int | None = None) -> TablesContent:
    """Decode the device table, every ITT and the collection table (ABI rev 0).

    Applies the kernel's restore checks, raising ItsTableError where
    KVM_DEV_ARM_ITS_RESTORE_TABLES would fail: a collection target >= nr_vcpus (when given),
    a duplicated ICID, an ITE whose pINTID < 8192, whose `next` leaves the device's EventID
    space, or whose collection is not in the collection table; a walk longer than
    `max_entries` entries, or an entry outside guest RAM. With `devbits` / `idbits` (the
    ITS's GITS_TYPER.Devbits + 1 and ID_bits + 1), a DTE of a DeviceID or with an EventID
    size beyond them, as MAPD refuses (vgic_its_restore_dte: vgic_its_check_id, and the
    EventID bits since "KVM: arm64: vgic-its: Reject restored DTEs with too many EventID bits").
    """
    reader = _Reader(mem, max_entries)
    collections: dict[int, int] = {}
    unmapped: list[int] = []
    ct = decode_baser(baser1)
    if ct.valid:
        if ct.indirect:
            raise ItsTableError("ABI rev 0 has no two-level collection table")
        for n in range(ct.size // ABI_REV0_ENTRY_SIZE):
            cte = decode_cte(reader.u64(ct.base + n * ABI_REV0_ENTRY_SIZE))
            if not cte.valid:
                break
            if cte.icid in collections or cte.icid in unmapped:
                raise ItsTableError(f"collection {cte.icid} appears twice")
            if cte.icid >= ct.size // ABI_REV0_ENTRY_SIZE:
                raise ItsTableError(f"ICID {cte.icid} is beyond the collection table")
            if cte.rdbase == COLLECTION_NOT_MAPPED:
                unmapped.append(cte.icid)
            elif nr_vcpus is not None and cte.rdbase >= nr_vcpus:
                raise ItsTableError(f"collection {cte.icid} targets vCPU {cte.rdbase}, "
                                    f"there are {nr_vcpus}")
            else:
                collections[cte.icid] = cte.rdbase
    known_icids = set(collections) | set(unmapped)

    devices: dict[int, dict] = {}
    dt = decode_baser(baser0)

    def on_dte(devid: int, value: int) -> int:
        dte = decode_dte(value)
        if not dte.valid:
            return 1
        if devbits is not None and devid >> devbits:
            raise ItsTableError(f"DeviceID {devid:#x} is beyond the ITS's {devbits} DeviceID bits")
        if idbits is not None and dte.size_bits > idbits:
            raise ItsTableError(f"device {devid:#x}: {dte.size_bits} EventID bits, the ITS "
                                f"has {idbits}")
        events: dict[int, dict] = {}
        limit = 1 << dte.size_bits

        def on_ite(eventid: int, raw: int) -> int:
            ite = decode_ite(raw)
            if not ite.intid:
                return 1
            if ite.intid < LPI_BASE:
                raise ItsTableError(f"device {devid:#x} event {eventid}: pINTID {ite.intid} < 8192")
            if eventid + ite.next >= limit:
                raise ItsTableError(f"device {devid:#x} event {eventid}: next {ite.next} "
                                    f"leaves its {dte.size_bits}-bit EventID space")
            if ite.icid not in known_icids:
                raise ItsTableError(f"device {devid:#x} event {eventid}: collection "
                                    f"{ite.icid} is not in the collection table")
            events[eventid] = {"icid": ite.icid, "intid": ite.intid}
            return ite.next

        if devid in devices:
            raise ItsTableError(f"device {devid:#x} appears twice")
        _scan(reader, dte.itt_addr, limit * ABI_REV0_ENTRY_SIZE, 0, on_ite)
        devices[devid] = {"events": events, "itt_addr": dte.itt_addr, "size_bits": dte.size_bits}
        return dte.next

    if dt.valid:
        if dt.indirect:
            per_page = dt.page_size // ABI_REV0_ENTRY_SIZE

            def on_l1(index: int, value: int) -> int:
                if not value >> 63:
                    return 1
                l2 = value & _ADDR52 & ~(dt.page_size - 1)
                return _scan(reader, l2, dt.page_size, index * per_page, on_dte)

            _scan(reader, dt.base, dt.size, 0, on_l1)
        else:
            _scan(reader, dt.base, dt.size, 0, on_dte)
    return TablesContent(canonical_dump(devices, collections), tuple(sorted(unmapped)))
