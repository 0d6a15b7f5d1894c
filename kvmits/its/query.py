"""Snapshots of an ITS's mapping state, and the translation query KVM never grew, answered from them.

An MSI (DeviceID, EventID) is translated by three look-ups (Arm IHI 0069, 5.2 "The ITS
translation process"): the device table gives the device's ITT and its EventID size, the ITT
gives the event's ITE (pINTID, ICID), the collection table gives the ICID's target
redistributor. Each look-up can miss, and the first that misses says why the MSI is dropped.

The kernel's ITS can only be read through KVM_DEV_ARM_ITS_SAVE_TABLES, which writes exactly
those three tables into guest memory (Documentation/virt/kvm/devices/arm-vgic-its.rst, ABI
rev 0). `ItsSnapshot.translate` follows the same three look-ups over their decoded content, so
a translation query works on the kernel's ITS as well as on kvmits' model, where
`ItsModel.translate` is the live answer and a snapshot of it answers the same.

What the saved tables cannot show: an ITE whose collection MAPC V=0 unmapped (an orphan) is
saved by Linux as an invalid entry. A snapshot of the model lists orphans, so it answers
"collection-unmapped" for them; a snapshot of the kernel's ITS cannot, and says "no-ite". Both
are misses: the MSI is dropped either way.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmits.its.abi import canonical_dump
from kvmits.its.model import (
    MISS_COLLECTION_UNMAPPED, MISS_DEVICE_UNMAPPED, MISS_EVENT_OUT_OF_RANGE, MISS_ITS_DISABLED,
    MISS_NO_ITE, REASON_NAMES, TRANSLATED, ItsModel, Translation,
)

#: where a snapshot's state came from
SOURCE_SAVE_TABLES = "KVM_DEV_ARM_ITS_SAVE_TABLES (ABI rev 0), decoded"
SOURCE_MODEL = "the userspace ITS model's state"


class ItsSnapshot(NamedTuple):
    """An ITS's mapping state at one moment: enough to answer any translation query."""

    its: str                    # which ITS: "kernel" or "user"
    source: str                 # how the state was read (SOURCE_*)
    enabled: bool               # GITS_CTLR.Enabled: a disabled ITS translates nothing
    dump: dict                  # abi.canonical_dump: devices (ITT, EventID bits, events), collections
    untargeted: tuple[int, ...]     # ICIDs known without a target (KVM's placeholder collections)
    orphans: tuple[tuple[int, int], ...] | None    # orphaned ITEs; None: this source cannot see them

    def translate(self, devid: int, eventid: int) -> Translation:
        """What an MSI (devid, eventid) would reach: the LPI, its collection and target vCPU,
        or the first look-up that misses (IHI 0069 5.2)."""
        if not self.enabled:
            return Translation(-1, -1, -1, MISS_ITS_DISABLED)
        dev = self.dump["devices"].get(devid)
        if dev is None:
            return Translation(-1, -1, -1, MISS_DEVICE_UNMAPPED)
        ite = dev["events"].get(eventid)
        if ite is None:
            if self.orphans and (devid, eventid) in self.orphans:
                return Translation(-1, -1, -1, MISS_COLLECTION_UNMAPPED)
            if eventid >> dev["size_bits"]:
                return Translation(-1, -1, -1, MISS_EVENT_OUT_OF_RANGE)
            return Translation(-1, -1, -1, MISS_NO_ITE)
        target = self.dump["collections"].get(ite["icid"])
        if target is None:
            return Translation(-1, -1, -1, MISS_COLLECTION_UNMAPPED)
        return Translation(ite["intid"], ite["icid"], target, TRANSLATED)

    def lpi_users(self, intid: int) -> list[tuple[int, int]]:
        """(DeviceID, EventID) of every ITE that maps LPI `intid`. KVM keeps one vgic_irq, so
        one target vCPU, per LPI number: when several ITEs map the same LPI with different
        collections, an MSI on any of them is delivered where the LPI's last MAPTI/MOVI/MAPC
        pointed it, which need not be its own ITE's collection."""
        return [(devid, eventid) for devid, dev in self.dump["devices"].items()
                for eventid, ite in dev["events"].items() if ite["intid"] == intid]

    def same_state(self, other: ItsSnapshot) -> bool:
        """The same mappings (devices, events, collections, untargeted collections, Enabled),
        whichever ITS each came from. Orphans are not compared: the kernel's are invisible."""
        return (self.enabled, self.dump, self.untargeted) == (other.enabled, other.dump, other.untargeted)

    def to_json(self) -> dict:
        """A JSON-able dict (integer keys become strings); from_json() reads it back."""
        return {
            "its": self.its, "source": self.source, "enabled": self.enabled,
            "collections": {str(i): t for i, t in self.dump["collections"].items()},
            "untargeted": list(self.untargeted),
            "devices": {str(d): {"itt_addr": dev["itt_addr"], "size_bits": dev["size_bits"],
                                 "events": {str(e): dict(ite) for e, ite in dev["events"].items()}}
                        for d, dev in self.dump["devices"].items()},
            "orphans": None if self.orphans is None else [list(k) for k in self.orphans],
        }

    @classmethod
    def from_json(cls, data: dict) -> ItsSnapshot:
        """Parse to_json()'s dict (ValueError, KeyError or TypeError if it is not one)."""
        orphans = data["orphans"]
        return cls(
            its=str(data["its"]), source=str(data["source"]), enabled=bool(data["enabled"]),
            dump=canonical_dump(data["devices"], data["collections"]),
            untargeted=tuple(int(i) for i in data["untargeted"]),
            orphans=None if orphans is None else tuple(sorted((int(d), int(e)) for d, e in orphans)),
        )


def model_snapshot(model: ItsModel, its: str = "user") -> ItsSnapshot:
    """A snapshot of the model. The caller keeps the model from changing meanwhile."""
    return ItsSnapshot(its, SOURCE_MODEL, model.enabled, model.dump(include_orphans=False),
                       model.unmapped_collections(), model.orphaned_ites())


def translation_to_json(result: Translation) -> dict:
    """A Translation as JSON: the reason by name ("translated", "no-ite", ...)."""
    return {"intid": result.intid, "icid": result.icid, "vcpu": result.target,
            "reason": result.reason_name}


def translation_from_json(data: dict) -> Translation:
    return Translation(int(data["intid"]), int(data["icid"]), int(data["vcpu"]),
                       REASON_NAMES.index(data["reason"]))
