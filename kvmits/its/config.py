"""The choices the architecture leaves to an ITS implementation, and this model's answers.

Every field defaults to what the in-kernel KVM ITS of Debian bookworm's Linux 6.1 (6.1.192,
arch/arm64/kvm/vgic/vgic-its.c) does, so a guest cannot tell the two apart. Where KVM's ITS
changed between kernels, the field is a named choice: `ItsConfig.kvm(release)` sets them for a
kernel release from KVM_CHANGES, and a machine probes the running kernel for them
(kvmits.machine.its.behaviour). `ItsConfig.spec()` gives the answers a physical ITS would more
typically give (all page sizes, RES0 bits read as zero, re-mapping keeps what is in memory,
erroneous commands stall the queue). Any field can be set on its own.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from typing import NamedTuple

from kvmits.its.registers import GITS_IIDR_KVM


class ErrorPolicy(enum.Enum):
    """What the command queue does with an erroneous command (IHI 0069, "Command errors")."""

    #: Skip it and go on: GITS_CREADR moves past it (KVM: errors are silent).
    IGNORE = "ignore"
    #: Stop in front of it with GITS_CREADR.Stalled = 1, until software writes GITS_CWRITER
    #: with Retry = 1 (the command at GITS_CREADR is then executed again) or writes GITS_CBASER.
    STALL = "stall"


class CwriterOutOfRange(enum.Enum):
    """GITS_CWRITER written with an offset >= the queue size: CONSTRAINED UNPREDICTABLE."""

    #: The write has no effect at all, GITS_CWRITER keeps its value (KVM).
    IGNORE_WRITE = "ignore-write"
    #: The value is kept and the queue is considered invalid: nothing is processed until
    #: GITS_CWRITER is written with an in-range value (the architecture's first option).
    STOP_QUEUE = "stop-queue"


class MaptiOverwrite(enum.Enum):
    """MAPTI/MAPI of an EventID that already has an ITE: UNPREDICTABLE."""

    KEEP_OLD = "keep-old"       # the command is accepted and changes nothing (KVM)
    REPLACE = "replace"         # the new ITE replaces the old one


class MapdRemap(enum.Enum):
    """MAPD V=1 of a DeviceID that is already mapped (UNPREDICTABLE with valid ITEs)."""

    DROP_EVENTS = "drop-events"     # all ITEs of the device are freed (KVM)
    KEEP_SAME_ITT = "keep-same-itt"  # ITEs stay when the ITT address is unchanged, the ones
    #                                  beyond the new size are dropped; a new ITT starts empty


class CollectionUnmap(enum.Enum):
    """What MAPC V=0 does to the ITEs that name the collection."""

    #: The ITEs lose their collection for good: they stop translating, MOVI and DISCARD
    #: fail on them, and mapping the ICID again does not revive them; only MAPD frees them
    #: (KVM: the ITE's collection pointer is set to NULL).
    ORPHAN = "orphan"
    #: The ITEs keep their ICID and translate again once the ICID is mapped (the ITE holds an
    #: ICID in the architecture, looked up in the collection table at translation time).
    KEEP = "keep"


@dataclass(frozen=True)
class ItsConfig:
    """Identity and behaviour of a modelled ITS. Defaults: the in-kernel ITS of Linux 6.1."""

    #: GITS_TYPER.Devbits + 1 and GITS_TYPER.ID_bits + 1 (EventID bits).
    devbits: int = 16
    idbits: int = 16
    iidr: int = GITS_IIDR_KVM
    #: Page sizes a guest may select in GITS_BASER<n>.Page_Size. KVM forces 64K: whatever the
    #: guest writes reads back as 64K. With several sizes, an unsupported one selects the first.
    page_sizes: tuple[int, ...] = (65536,)
    #: GITS_BASER1 (collection table) may be two-level (KVM: Indirect is RAZ/WI there).
    collection_indirect: bool = False
    #: Clear GITS_CBASER bits [15:12] on write, i.e. a 64K-aligned queue (KVM).
    cbaser_64k_aligned: bool = True
    #: Store RES0 bits of GITS_CBASER as written (KVM) instead of reading them as zero.
    keep_res0_bits: bool = True
    #: Rewrite reserved/unsupported cacheability and shareability values like KVM
    #: (Outer Shareable -> Inner Shareable, Inner nC/Device -> RaWb, Outer != nC -> same as inner).
    sanitise_attributes: bool = True
    #: A GITS_BASER0/1 write with Valid = 0 forgets every device / collection (KVM).
    baser_invalid_forgets: bool = True
    error_policy: ErrorPolicy = ErrorPolicy.IGNORE
    cwriter_out_of_range: CwriterOutOfRange = CwriterOutOfRange.IGNORE_WRITE
    mapti_overwrite: MaptiOverwrite = MaptiOverwrite.KEEP_OLD
    mapd_remap: MapdRemap = MapdRemap.DROP_EVENTS
    collection_unmap: CollectionUnmap = CollectionUnmap.ORPHAN
    #: CLEAR and INV need the ITE's collection to be mapped (a physical ITS must know the
    #: target Redistributor). KVM does not check: they succeed on an unmapped collection.
    strict_collection_checks: bool = False
    #: DISCARD also removes the interrupt's pending state, as the architecture says (IHI 0069,
    #: 5.3.4). KVM does not (Linux 6.1, vgic_its_cmd_handle_discard frees the ITE only): an LPI
    #: already pending stays pending and is still delivered, on the vCPU KVM has it on (the
    #: differential check's masked programs show it, tests/arm64/test_differential.py).
    discard_clears_pending: bool = False
    #: MAPC V=0 checks RDbase as V=1 does: a processor number past the last vCPU fails with
    #: E_ITS_MAPC_PROCNUM_OOR and the collection stays mapped (Linux 6.1). Since Linux 6.7
    #: ("KVM: arm64: vgic-its: Treat the collection target address as a vcpu_id") KVM looks the
    #: vCPU up for V=1 only, and V=0 unmaps whatever RDbase says (seen on 6.12.118).
    mapc_unmap_checks_target: bool = True
    #: MAPD V=0 writes zero over the device's table entry and DISCARD over the ITE, in guest
    #: memory (Linux 6.13 "KVM: arm64: vgic-its: Clear DTE when MAPD unmaps a device" and
    #: "... Clear ITE when DISCARD frees an ITE", backported to 6.1.120 and 6.12.5): a later
    #: KVM_DEV_ARM_ITS_RESTORE_TABLES no longer finds what was unmapped. The architecture leaves
    #: the ITS's table memory to the ITS (IHI 0069 5.2), so a guest must not look.
    zero_freed_entries: bool = True
    #: Work per GITS_CWRITER write at most: commands, plus the ITEs walked by a MAPC that
    #: re-targets or unmaps a collection and by a MAPD that frees a device (each one unit), so
    #: that one MMIO exit stays bounded however many ITEs a collection holds. The rest continue
    #: on the next GITS_CWRITER write, GITS_CREADR/GITS_CTLR read (a guest polling for
    #: completion), or an explicit process_commands(). The queue holds at most 32768 commands.
    command_budget: int = 1024
    #: Resource limit on interrupt translation entries (KVM allocates kernel memory per ITE
    #: and fails MAPTI with -ENOMEM when it cannot); bounds the model's memory and the work
    #: of one MAPC/MOVALL.
    max_ites: int = 1 << 17
    #: How many command errors are kept in ItsModel.error_log (all of them are counted).
    error_log_size: int = 256
    #: Log lines for guest mistakes (bad accesses, command errors) before going quiet.
    log_limit: int = 64

    def __post_init__(self):
        if not 1 <= self.devbits <= 32 or not 14 <= self.idbits <= 32:
            raise ValueError("devbits must be 1..32 and idbits 14..32 (LPIs start at 8192)")
        if not self.page_sizes or any(p not in (4096, 16384, 65536) for p in self.page_sizes):
            raise ValueError(f"page_sizes must be a non-empty subset of 4K/16K/64K: {self.page_sizes}")
        if self.command_budget < 1 or self.max_ites < 0 or self.error_log_size < 0:
            raise ValueError("command_budget must be >= 1, max_ites and error_log_size >= 0")

    @classmethod
    def kvm(cls, release: str, **overrides) -> "ItsConfig":
        """The in-kernel ITS of Linux `release` ("6.12.118+deb13-arm64", "6.1.0-57-arm64" with
        `version`, or "6.12.118"), as KVM_CHANGES knows it. A kernel that is not a release
        (a developer's own build) is better probed: kvmits.machine.its.behaviour."""
        return cls(**{**kvm_choices(kernel_version(release)), **overrides})

    @classmethod
    def spec(cls, **overrides) -> "ItsConfig":
        """Choices a physical GICv3 ITS typically makes where the architecture allows it."""
        base = cls(page_sizes=(4096, 16384, 65536), collection_indirect=True,
                   cbaser_64k_aligned=False, keep_res0_bits=False, sanitise_attributes=False,
                   baser_invalid_forgets=False, error_policy=ErrorPolicy.STALL,
                   cwriter_out_of_range=CwriterOutOfRange.STOP_QUEUE,
                   mapti_overwrite=MaptiOverwrite.REPLACE, mapd_remap=MapdRemap.KEEP_SAME_ITT,
                   collection_unmap=CollectionUnmap.KEEP, strict_collection_checks=True,
                   discard_clears_pending=True)
        return replace(base, **overrides)


class KvmChange(NamedTuple):
    """A change of KVM's ITS a guest can see: the ItsConfig field it sets, its value before and
    from `since` on (a stable backport counts as the release that has it)."""

    field: str
    before: object
    after: object
    since: tuple[tuple[int, ...], ...]    # first version of each line that has it (6.1.120, 6.12.5, 6.13)
    what: str


#: What differs between the kernels kvmits has been checked on (docs/kernels.md), newest last.
KVM_CHANGES = (
    KvmChange("mapc_unmap_checks_target", True, False, ((6, 7),),
              "MAPC V=0 no longer checks RDbase (a vcpu_id since 6.7)"),
    KvmChange("zero_freed_entries", False, True, ((6, 1, 120), (6, 12, 5), (6, 13)),
              "MAPD V=0 and DISCARD zero the guest's table entries"),
)


def kernel_version(release: str) -> tuple[int, ...]:
    """(6, 12, 118) from "6.12.118+deb13-arm64"; Debian's 6.1 package names ("6.1.0-57-arm64")
    carry no patch level: give `uname -v`'s "Debian 6.1.192-3" or the version itself then."""
    if re.match(r"\d+\.\d+\.0-\d+-", release):
        raise ValueError(f"{release!r} is a Debian ABI name without the patch level: "
                         "give the version from `uname -v` (e.g. 'Debian 6.1.192-3')")
    m = re.search(r"(?:Debian |^)(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        raise ValueError(f"not a kernel version: {release!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


def _has(version: tuple[int, ...], since: tuple[tuple[int, ...], ...]) -> bool:
    """Does `version` have a change first released in `since` (one version per stable line)?"""
    for first in since:
        if version[:2] == first[:2]:
            return version >= first
    return version >= max(since)


def kvm_choices(version: tuple[int, ...]) -> dict:
    """The KVM_CHANGES fields for a kernel version."""
    return {c.field: (c.after if _has(version, c.since) else c.before) for c in KVM_CHANGES}
