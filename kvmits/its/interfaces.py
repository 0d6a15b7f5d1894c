"""What the ITS model needs from its surroundings, as typing.Protocol classes.

The model knows nothing of KVM. It is given:

* a **guest memory** (`GuestMemory`): bytes by guest-physical address, bounds-checked.
  `kvmits.kvm.GuestMemory` is one; tests use a bytearray fake.
* an **LPI sink** (`LpiSink`): where translated interrupts and the redistributor side of
  commands go. The real one drives a hidden in-kernel ITS (kvmits.machine.its.hidden,
  docs/userspace-its.md);
  `RecordingSink` records calls for tests and tools; `NullSink` drops them.
* a **redistributor view** (`RedistributorView`): how many vCPUs there are (GITS_TYPER.PTA
  is 0, so a target/RDbase is a vCPU index) and the exclusive upper bound of valid LPI
  INTIDs, from GICR_PROPBASER.IDbits. `Redistributors` is a plain implementation.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable


@runtime_checkable
class GuestMemory(Protocol):
    """Guest RAM by guest-physical address.

    Both methods raise `kvmits.errors.GuestMemoryError` when any byte of the range is not
    backed by guest RAM; the model catches it and handles it the way the architecture says
    (a command that cannot be read, a table entry that is not there). The model writes guest
    memory only in `ItsModel.save_tables()` (like KVM_DEV_ARM_ITS_SAVE_TABLES) and, with
    ItsConfig.zero_freed_entries, zeroes over the entry MAPD V=0 or DISCARD frees, as KVM does.
    """

    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


@runtime_checkable
class LpiSink(Protocol):
    """The redistributor side: makes LPIs pending and keeps a delivery engine in step.

    `target` is a vCPU index (0 <= target < nr_vcpus). Calls come from inside command
    processing or `signal_msi`; they must not call back into the model's command queue.

    `mapped` and `unmapped` follow the ITEs, not their translations: KVM keeps one interrupt
    (vgic_irq) per LPI for as long as any ITE names it, with one target and one pending state,
    whatever becomes of the ITEs' collections (vgic-its.c: vgic_add_lpi, its_free_ite). A MAPC
    that unmaps a collection keeps its ITEs, so it calls nothing; re-targets come as `move`.
    DISCARD calls `unmapped` after `clear_pending` if ItsConfig.discard_clears_pending (KVM
    leaves a pending LPI pending).
    """

    def set_pending(self, intid: int, target: int) -> None:
        """INT, or a translated MSI (GITS_TRANSLATER write / signal_msi)."""

    def clear_pending(self, intid: int, target: int | None) -> None:
        """CLEAR, and the removal of the pending state by DISCARD. `target` None: a CLEAR the
        model accepted for an ITE whose collection is not mapped (KVM clears the LPI's pending
        state wherever the LPI is)."""

    def invalidate(self, intid: int, target: int | None) -> None:
        """INV: re-read the LPI's configuration (priority, enable) from the property table;
        `target` None as for clear_pending."""

    def invalidate_all(self, target: int) -> None:
        """INVALL: re-read the configuration of every LPI of the collection's target."""

    def move(self, intid: int, old_target: int, new_target: int) -> None:
        """The LPI's target becomes `new_target`, its pending state with it: MOVI, and a MAPC
        (re)mapping a collection that holds the LPI. As KVM does (update_affinity), this comes
        also when `new_target` is the target the ITE already names: an LPI is one interrupt
        with one target however many ITEs map it, and MOVALL moves LPIs without changing
        their ITEs, so the LPI may sit elsewhere until this call."""

    def move_all(self, old_target: int, new_target: int) -> None:
        """MOVALL: move the pending state of all LPIs of one redistributor to another."""

    def mapped(self, intid: int, target: int | None) -> None:
        """An ITE naming `intid` was made (MAPTI, MAPI, a restore): `target` is its
        collection's, None when the collection has none yet. KVM creates the LPI's interrupt
        with the first ITE, on that target or none; a later ITE finds it as it is."""

    def unmapped(self, intid: int, target: int | None) -> None:
        """An ITE naming `intid` is gone (DISCARD, MAPD, MAPTI over it, a reset or restore):
        `target` is its collection's now, or None. With the last one KVM lets the interrupt go
        (it lives on while a vCPU still has it queued)."""


@runtime_checkable
class RedistributorView(Protocol):
    """The redistributors as the ITS sees them."""

    @property
    def nr_vcpus(self) -> int: ...

    def lpi_intid_limit(self) -> int:
        """Exclusive upper bound of valid LPI INTIDs: 2 ** (GICR_PROPBASER.IDbits + 1)."""


class Redistributors:
    """A `RedistributorView` from a vCPU count and an optional INTID-bound callable."""

    def __init__(self, nr_vcpus: int, lpi_intid_limit: Callable[[], int] | int = 1 << 16):
        if nr_vcpus < 1:
            raise ValueError("nr_vcpus must be >= 1")
        self._nr_vcpus = nr_vcpus
        if callable(lpi_intid_limit):
            self._limit = lpi_intid_limit
        else:
            value = int(lpi_intid_limit)
            self._limit = lambda: value

    @property
    def nr_vcpus(self) -> int:
        return self._nr_vcpus

    def lpi_intid_limit(self) -> int:
        return self._limit()

    def __repr__(self) -> str:
        return f"Redistributors(nr_vcpus={self._nr_vcpus}, lpi_intid_limit={self._limit()})"


class NullSink:
    """An LPI sink that drops everything."""

    def set_pending(self, intid: int, target: int) -> None:
        pass

    def clear_pending(self, intid: int, target: int) -> None:
        pass

    def invalidate(self, intid: int, target: int) -> None:
        pass

    def invalidate_all(self, target: int) -> None:
        pass

    def move(self, intid: int, old_target: int, new_target: int) -> None:
        pass

    def move_all(self, old_target: int, new_target: int) -> None:
        pass

    def mapped(self, intid: int, target: int | None) -> None:
        pass

    def unmapped(self, intid: int, target: int | None) -> None:
        pass


class RecordingSink:
    """An LPI sink that records every call as a tuple ``(method name, *arguments)``.

    `calls` holds them in order; `pending` tracks which (intid, target) pairs are pending
    (set by set_pending, cleared by clear_pending, carried by move/move_all) and `refs` how
    many ITEs name each LPI (mapped/unmapped), so tests can check outcomes as well as call
    sequences.
    """

    def __init__(self):
        self.calls: list[tuple] = []
        self.pending: set[tuple[int, int]] = set()
        self.refs: dict[int, int] = {}

    def clear(self) -> None:
        self.calls.clear()

    def of(self, name: str) -> list[tuple]:
        """The arguments of every recorded call of method `name`."""
        return [c[1:] for c in self.calls if c[0] == name]

    def set_pending(self, intid: int, target: int) -> None:
        self.calls.append(("set_pending", intid, target))
        self.pending.add((intid, target))

    def clear_pending(self, intid: int, target: int) -> None:
        self.calls.append(("clear_pending", intid, target))
        self.pending.discard((intid, target))

    def invalidate(self, intid: int, target: int) -> None:
        self.calls.append(("invalidate", intid, target))

    def invalidate_all(self, target: int) -> None:
        self.calls.append(("invalidate_all", target))

    def move(self, intid: int, old_target: int, new_target: int) -> None:
        self.calls.append(("move", intid, old_target, new_target))
        if (intid, old_target) in self.pending:
            self.pending.discard((intid, old_target))
            self.pending.add((intid, new_target))

    def move_all(self, old_target: int, new_target: int) -> None:
        self.calls.append(("move_all", old_target, new_target))
        moved = {p for p in self.pending if p[1] == old_target}
        self.pending -= moved
        self.pending |= {(intid, new_target) for intid, _ in moved}

    def mapped(self, intid: int, target: int | None) -> None:
        self.calls.append(("mapped", intid, target))
        self.refs[intid] = self.refs.get(intid, 0) + 1

    def unmapped(self, intid: int, target: int | None) -> None:
        self.calls.append(("unmapped", intid, target))
        count = self.refs.get(intid, 0) - 1
        if count > 0:
            self.refs[intid] = count
        else:
            self.refs.pop(intid, None)
