"""GITS_* register offsets, fields and reset values (Arm IHI 0069, chapter 12 "The ITS registers").

Everything here is data plus small pure helpers that decode the table descriptors
(GITS_BASER<n>, GITS_CBASER). The register *behaviour* lives in model.py.

Offsets are relative to the ITS control frame (ITS_base); the translation frame is the
second 64 KiB page, so GITS_TRANSLATER is at ITS_base + 0x10040.
"""

from __future__ import annotations

from typing import NamedTuple

# -- frame layout --------------------------------------------------------------------------
ITS_FRAME_SIZE = 0x20000          # control frame (64 KiB) + translation frame (64 KiB)
ITS_TRANSLATION_FRAME = 0x10000

# -- control frame -------------------------------------------------------------------------
GITS_CTLR = 0x0000
GITS_IIDR = 0x0004
GITS_TYPER = 0x0008
GITS_MPAMIDR = 0x0010             # GICv3.1 MPAM: not implemented (reserved here)
GITS_PARTIDR = 0x0014
GITS_MPIDR = 0x0018               # GICv4.1: not implemented
GITS_STATUSR = 0x0040             # GICv3.1 unmapped-MSI reporting: not implemented
GITS_UMSIR = 0x0048
GITS_CBASER = 0x0080
GITS_CWRITER = 0x0088
GITS_CREADR = 0x0090
GITS_BASER0 = 0x0100              # GITS_BASER<n> at 0x100 + 8 * n, n = 0..7
GITS_BASER_COUNT = 8
GITS_PIDR4 = 0xFFD0
GITS_PIDR5 = 0xFFD4
GITS_PIDR6 = 0xFFD8
GITS_PIDR7 = 0xFFDC
GITS_PIDR0 = 0xFFE0
GITS_PIDR1 = 0xFFE4
GITS_PIDR2 = 0xFFE8
GITS_PIDR3 = 0xFFEC
GITS_CIDR0 = 0xFFF0
GITS_CIDR1 = 0xFFF4
GITS_CIDR2 = 0xFFF8
GITS_CIDR3 = 0xFFFC

# -- translation frame ---------------------------------------------------------------------
GITS_TRANSLATER = 0x10040


def GITS_BASER(n: int) -> int:   # named like the register
    """Offset of GITS_BASER<n> (n = 0..7)."""
    if not 0 <= n < GITS_BASER_COUNT:
        raise ValueError(f"GITS_BASER{n}: n must be 0..{GITS_BASER_COUNT - 1}")
    return GITS_BASER0 + 8 * n


# -- LPIs ----------------------------------------------------------------------------------
#: the first LPI INTID: INTIDs 8192 and up are LPIs (IHI 0069, 2.2.1 "INTIDs")
LPI_BASE = 8192

# -- GITS_CTLR -----------------------------------------------------------------------------
GITS_CTLR_ENABLED = 1 << 0
GITS_CTLR_QUIESCENT = 1 << 31     # RO; resets to 1

# -- GITS_TYPER ----------------------------------------------------------------------------
GITS_TYPER_PHYSICAL = 1 << 0
GITS_TYPER_VIRTUAL = 1 << 1
GITS_TYPER_ITT_ENTRY_SIZE_SHIFT = 4     # [7:4] bytes - 1
GITS_TYPER_IDBITS_SHIFT = 8             # [12:8] EventID bits - 1
GITS_TYPER_DEVBITS_SHIFT = 13           # [17:13] DeviceID bits - 1
GITS_TYPER_SEIS = 1 << 18
GITS_TYPER_PTA = 1 << 19
GITS_TYPER_CIL = 1 << 36

# -- GITS_IIDR -----------------------------------------------------------------------------
IMPLEMENTER_ARM = 0x43B
PRODUCT_ID_KVM = 0x4B
GITS_IIDR_KVM = (PRODUCT_ID_KVM << 24) | IMPLEMENTER_ARM      # Revision 0 = table ABI rev 0

# -- GITS_BASER<n> -------------------------------------------------------------------------
GITS_BASER_VALID = 1 << 63
GITS_BASER_INDIRECT = 1 << 62
GITS_BASER_INNERCACHE_SHIFT = 59        # [61:59]
GITS_BASER_TYPE_SHIFT = 56              # [58:56], RO
GITS_BASER_TYPE_MASK = 0x7 << 56
GITS_BASER_OUTERCACHE_SHIFT = 53        # [55:53]
GITS_BASER_ENTRY_SIZE_SHIFT = 48        # [52:48], RO, bytes - 1
GITS_BASER_ENTRY_SIZE_MASK = 0x1F << 48
GITS_BASER_ADDR_MASK = ((1 << 48) - 1) & ~0xFFF    # [47:12]
GITS_BASER_SHAREABILITY_SHIFT = 10      # [11:10]
GITS_BASER_PAGE_SIZE_SHIFT = 8          # [9:8]
GITS_BASER_PAGE_SIZE_MASK = 0x3 << 8
GITS_BASER_SIZE_MASK = 0xFF             # [7:0] pages - 1
GITS_BASER_RO_MASK = GITS_BASER_TYPE_MASK | GITS_BASER_ENTRY_SIZE_MASK

GITS_BASER_TYPE_NONE = 0
GITS_BASER_TYPE_DEVICE = 1
GITS_BASER_TYPE_VPE = 2
GITS_BASER_TYPE_COLLECTION = 4

# Page_Size encodings; 0b11 is reserved (decoded as 64K, the largest).
#: the 64 KiB page: GITS_BASER<n>.Page_Size 0b10, and the granule of the ITS's two frames
PAGE_64K = 0x10000
PAGE_SIZE_ENCODING = {4096: 0, 16384: 1, 65536: 2}
PAGE_SIZE_DECODING = {0: 4096, 1: 16384, 2: 65536, 3: 65536}

# -- GITS_CBASER ---------------------------------------------------------------------------
GITS_CBASER_VALID = 1 << 63
GITS_CBASER_INNERCACHE_SHIFT = 59
GITS_CBASER_OUTERCACHE_SHIFT = 53
GITS_CBASER_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF   # [51:12]
GITS_CBASER_SHAREABILITY_SHIFT = 10
GITS_CBASER_SIZE_MASK = 0xFF                       # [7:0] 4 KiB pages - 1
# Fields the architecture defines; everything else is RES0.
GITS_CBASER_DEFINED = (GITS_CBASER_VALID | (0x7 << GITS_CBASER_INNERCACHE_SHIFT)
                       | (0x7 << GITS_CBASER_OUTERCACHE_SHIFT) | GITS_CBASER_ADDR_MASK
                       | (0x3 << GITS_CBASER_SHAREABILITY_SHIFT) | GITS_CBASER_SIZE_MASK)

# -- GITS_CWRITER / GITS_CREADR ------------------------------------------------------------
GITS_CWRITER_RETRY = 1 << 0
GITS_CREADR_STALLED = 1 << 0
GITS_CMD_OFFSET_MASK = 0xFFFE0          # Offset, bits [19:5]
ITS_CMD_SIZE = 32

# -- cacheability / shareability encodings shared by BASER and CBASER -----------------------
CACHE_nCnB = 0          # inner: Device-nGnRnE; outer: same as inner
CACHE_nC = 1
CACHE_RaWb = 3
CACHE_SAME_AS_INNER = 0
SHARE_NON = 0
SHARE_INNER = 1
SHARE_OUTER = 2

# -- reset values of the in-kernel ITS (read on the testbed, Linux 6.1) ----------------------
KVM_BASER_INITIAL = ((CACHE_RaWb << GITS_BASER_INNERCACHE_SHIFT)
                     | (CACHE_SAME_AS_INNER << GITS_BASER_OUTERCACHE_SHIFT)
                     | (SHARE_INNER << GITS_BASER_SHAREABILITY_SHIFT)
                     | (PAGE_SIZE_ENCODING[65536] << GITS_BASER_PAGE_SIZE_SHIFT))

# Peripheral / component ID registers, as the in-kernel ITS reports them (ARM part 0x492,
# GICv3 architecture in PIDR2, a 64 KiB register frame in PIDR4). The ones not listed read 0.
ID_REGISTERS = {
    GITS_PIDR0: 0x92,
    GITS_PIDR1: 0xB4,
    GITS_PIDR2: 0x3B,
    GITS_PIDR4: 0x40,
    GITS_CIDR0: 0x0D,
    GITS_CIDR1: 0xF0,
    GITS_CIDR2: 0x05,
    GITS_CIDR3: 0xB1,
}
ID_REGISTER_OFFSETS = tuple(range(GITS_PIDR4, GITS_CIDR3 + 4, 4))

REGISTER_NAMES = {
    GITS_CTLR: "GITS_CTLR", GITS_IIDR: "GITS_IIDR", GITS_TYPER: "GITS_TYPER",
    GITS_CBASER: "GITS_CBASER", GITS_CWRITER: "GITS_CWRITER", GITS_CREADR: "GITS_CREADR",
    GITS_TRANSLATER: "GITS_TRANSLATER",
    **{GITS_BASER0 + 8 * n: f"GITS_BASER{n}" for n in range(GITS_BASER_COUNT)},
    GITS_PIDR0: "GITS_PIDR0", GITS_PIDR1: "GITS_PIDR1", GITS_PIDR2: "GITS_PIDR2",
    GITS_PIDR3: "GITS_PIDR3", GITS_PIDR4: "GITS_PIDR4", GITS_PIDR5: "GITS_PIDR5",
    GITS_PIDR6: "GITS_PIDR6", GITS_PIDR7: "GITS_PIDR7", GITS_CIDR0: "GITS_CIDR0",
    GITS_CIDR1: "GITS_CIDR1", GITS_CIDR2: "GITS_CIDR2", GITS_CIDR3: "GITS_CIDR3",
}


_REGS64 = frozenset([GITS_TYPER, GITS_CBASER, GITS_CWRITER, GITS_CREADR,
                     *(GITS_BASER0 + 8 * n for n in range(GITS_BASER_COUNT))])


def register_name(offset: int) -> str:
    """The GITS_* name of a register offset (either half of a 64-bit register), or hex."""
    base = offset & ~7
    if offset & 4 and base in _REGS64:
        return REGISTER_NAMES[base] + "[63:32]"
    return REGISTER_NAMES.get(offset, f"ITS+{offset:#x}")


def make_typer(devbits: int, idbits: int, itt_entry_size: int = 8) -> int:
    """GITS_TYPER of a physical-LPI ITS with PTA = 0 and 16-bit ICIDs (CIL = 0, HCC = 0)."""
    return (GITS_TYPER_PHYSICAL
            | ((itt_entry_size - 1) << GITS_TYPER_ITT_ENTRY_SIZE_SHIFT)
            | ((idbits - 1) << GITS_TYPER_IDBITS_SHIFT)
            | ((devbits - 1) << GITS_TYPER_DEVBITS_SHIFT))


class TableGeometry(NamedTuple):
    """Where a GITS_BASER<n> table is and how it is organised (all zero when not Valid)."""

    valid: bool
    indirect: bool
    base: int           # guest-physical address of the (level-1) table
    size: int           # bytes of the (level-1) table: (Size + 1) pages
    page_size: int      # bytes; also the size of each level-2 page of a two-level table
    entry_size: int     # bytes per entry (of the flat table, or of the level-2 pages)
    type: int


INVALID_TABLE = TableGeometry(False, False, 0, 0, 65536, 8, 0)


def baser_address(baser: int, page_size: int) -> int:
    """The table address a GITS_BASER<n> value encodes for its page size.

    With 4K and 16K pages the address is bits [47:12] (16K: [47:14]). With 64K pages,
    bits [47:16] are PA[47:16] and bits [15:12] hold PA[51:48] (52-bit PA format).
    """
    if page_size == 65536:
        return (baser & 0x0000_FFFF_FFFF_0000) | (((baser >> 12) & 0xF) << 48)
    return baser & 0x0000_FFFF_FFFF_F000 & ~(page_size - 1)


def decode_baser(baser: int) -> TableGeometry:
    """Geometry of the table a GITS_BASER<n> value describes."""
    if not baser & GITS_BASER_VALID:
        return INVALID_TABLE
    page_size = PAGE_SIZE_DECODING[(baser >> GITS_BASER_PAGE_SIZE_SHIFT) & 3]
    return TableGeometry(
        True,
        bool(baser & GITS_BASER_INDIRECT),
        baser_address(baser, page_size),
        ((baser & GITS_BASER_SIZE_MASK) + 1) * page_size,
        page_size,
        ((baser >> GITS_BASER_ENTRY_SIZE_SHIFT) & 0x1F) + 1,
        (baser >> GITS_BASER_TYPE_SHIFT) & 7,
    )


def cbaser_queue(cbaser: int) -> tuple[int, int]:
    """(address, size in bytes) of the command queue; size 0 when GITS_CBASER is not Valid."""
    if not cbaser & GITS_CBASER_VALID:
        return 0, 0
    return cbaser & GITS_CBASER_ADDR_MASK, ((cbaser & GITS_CBASER_SIZE_MASK) + 1) * 4096


def encode_baser(*, valid: bool, type_: int, base: int, pages: int, page_size: int = 65536,
                 indirect: bool = False, entry_size: int = 8,
                 inner: int = CACHE_RaWb, outer: int = CACHE_SAME_AS_INNER,
                 shareability: int = SHARE_INNER) -> int:
    """Build a GITS_BASER<n> value (what a guest driver writes); for tests and tools."""
    if not 1 <= pages <= 256:
        raise ValueError(f"pages must be 1..256, got {pages}")
    if base % page_size:
        raise ValueError(f"table base {base:#x} is not aligned to its {page_size} B pages")
    if page_size == 65536:
        addr = (base & 0x0000_FFFF_FFFF_0000) | (((base >> 48) & 0xF) << 12)
    else:
        addr = base & 0x0000_FFFF_FFFF_F000
    return ((GITS_BASER_VALID if valid else 0) | (GITS_BASER_INDIRECT if indirect else 0)
            | (inner << GITS_BASER_INNERCACHE_SHIFT) | (type_ << GITS_BASER_TYPE_SHIFT)
            | (outer << GITS_BASER_OUTERCACHE_SHIFT)
            | ((entry_size - 1) << GITS_BASER_ENTRY_SIZE_SHIFT) | addr
            | (shareability << GITS_BASER_SHAREABILITY_SHIFT)
            | (PAGE_SIZE_ENCODING[page_size] << GITS_BASER_PAGE_SIZE_SHIFT) | (pages - 1))


def encode_cbaser(*, base: int, pages: int, valid: bool = True, inner: int = CACHE_RaWb,
                  outer: int = CACHE_SAME_AS_INNER, shareability: int = SHARE_INNER) -> int:
    """Build a GITS_CBASER value: a queue of `pages` 4 KiB pages at `base`."""
    if not 1 <= pages <= 256:
        raise ValueError(f"pages must be 1..256, got {pages}")
    if base & 0xFFF:
        raise ValueError(f"command queue base {base:#x} is not 4 KiB aligned")
    return ((GITS_CBASER_VALID if valid else 0) | (inner << GITS_CBASER_INNERCACHE_SHIFT)
            | (outer << GITS_CBASER_OUTERCACHE_SHIFT) | (base & GITS_CBASER_ADDR_MASK)
            | (shareability << GITS_CBASER_SHAREABILITY_SHIFT) | (pages - 1))
