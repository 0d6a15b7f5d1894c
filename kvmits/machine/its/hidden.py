"""LPI delivery for the userspace ITS: a hidden in-kernel ITS, programmed only by the VMM.

The in-kernel vGICv3 takes LPIs only from an in-kernel ITS (KVM_SIGNAL_MSI and MSI routes whose
doorbell is an in-kernel ITS's GITS_TRANSLATER). So `HiddenIts` is the LPI sink of the Python
ITS model (kvmits.its.LpiSink): a second KVM_DEV_TYPE_ARM_VGIC_ITS at an address the guest is
never told about, whose tables and command queue live in a VMM-owned memory slot, and which is
programmed through KVM_SET_DEVICE_ATTR(KVM_DEV_ARM_VGIC_GRP_ITS_REGS): a write of GITS_CWRITER
runs the queued commands before the ioctl returns.

Its mapping keeps every LPI where the kernel's own ITS would have it. In KVM an LPI is one
vgic_irq with one target vCPU (or none), however many ITEs map it, alive while any ITE names it
(vgic-its.c: vgic_add_lpi, update_affinity, its_free_ite). The hidden ITS issues the command
that makes KVM do the same to its own vgic_irq at the same point:
- *injector* devices (DeviceIDs INJECTOR_FIRST_DEVID + k) of 1024 events each: LPI 8192 + n is
  EventID n % 1024 of injector n // 1024 (`injector_msi`). Not one device of 2^16 events: KVM
  keeps a device's ITEs in a list that every command and every translation-cache miss walks
  (vgic-its.c: find_ite), so one device holding every LPI made each of them cost O(LPIs);
- one collection per vCPU: ICID n -> vCPU n (the model hands us targets, not the guest's ICIDs);
- the guest's first ITE of an LPI: MAPTI on that ITE's target; on a collection without a target,
  an LPI without one (an ITE of the *creator* device, DeviceID 1, on UNTARGETED_ICID makes it,
  the injector's ITE takes it, a MAPD of the creator frees the creator's ITE). A
  later ITE of the same LPI changes nothing (vgic_add_lpi returns the existing interrupt).
  Every update_affinity (MOVI, a MAPC of a collection holding the LPI, also to an unchanged
  target): MOVI. The last ITE gone: DISCARD. MOVALL, INT, CLEAR, INV and INVALL as they come.
  `mapping()` is therefore where an MSI really goes, which can differ from the model's
  translation (the ITE's collection) for an LPI shared by ITEs or moved by MOVALL.

Rules the kernel enforces (docs/userspace-its.md, "What the kernel enforces"; Linux 6.1), and what we do:
- every attribute access needs all vCPUs out of KVM_RUN (EBUSY otherwise): commands are queued
  in `batch()` and run by one GITS_CWRITER write in `flush()`, which the caller makes while the
  machine is paused. Outside a batch, `set_pending` (a translated MSI) goes straight to
  KVM_SIGNAL_MSI, which needs no pause;
- Enabled = 1 is ignored until GITS_BASER0/1 and GITS_CBASER are Valid; tables 64 KiB-aligned;
- command errors are silent (GITS_CREADR always advances): the model has already checked what
  the kernel checks (the LPI against GICR_PROPBASER.IDbits), so a mapping the model accepted is
  one the hidden ITS accepts; a KVM_SIGNAL_MSI that still does not translate is counted (`dropped`).
- the hidden frame is live for the guest unless covered: the machine maps a small read-write slot
  over it, and keeps this module's memory in a read-only slot (guest writes exit to the VMM and
  are dropped; KVM reads it as usual).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from kvmits.its import commands as cmd
from kvmits.its.registers import (GITS_BASER, GITS_BASER_PAGE_SIZE_SHIFT, GITS_BASER_VALID, GITS_CBASER,
                                  GITS_CBASER_VALID, GITS_CREADR, GITS_CTLR, GITS_CTLR_ENABLED, GITS_CWRITER,
                                  LPI_BASE, PAGE_SIZE_ENCODING)
from kvmits.machine.memmap import HIDDEN_ITS_PRIVATE_SIZE

log = logging.getLogger(__name__)

#: the injector devices: INJECTOR_EVENTS events each, together one event per LPI
INJECTOR_FIRST_DEVID = 0x100
INJECTOR_EVENT_BITS = 10
INJECTOR_EVENTS = 1 << INJECTOR_EVENT_BITS
# The creator device makes an LPI without a target, as the guest's first ITE on a collection
# without one makes it in KVM (see HiddenIts.mapped), through an ITE on UNTARGETED_ICID, the
# one collection the hidden ITS never maps: the last entry of its one-page collection table.
CREATOR_DEVID = 1
EVENT_BITS = 16                    # LPIs 8192 .. 2**16 - 1 (GITS_TYPER.IDbits of KVM's ITS is 16)
NR_INJECTORS = ((1 << EVENT_BITS) - LPI_BASE) // INJECTOR_EVENTS

# The VMM-private memory: all 64 KiB-aligned (KVM decodes BASER addresses in the 64K format).
DT_OFFSET = 0x00000                # device table: 1 page, flat (8192 DeviceIDs: creator, injectors)
CT_OFFSET = 0x10000                # collection table: 1 page
CQ_OFFSET = 0x20000                # command queue: 64 KiB = 2048 commands
CQ_SIZE = 0x10000
ITT_OFFSET = 0x80000               # the injectors' ITTs: 2**16 events x 8 bytes = 512 KiB in all
INJECTOR_ITT_SIZE = INJECTOR_EVENTS * 8   # injector k's ITT at ITT_OFFSET + k * this: the ITE of
#                                           LPI 8192 + n at ITT_OFFSET + 8 n, as with one device
UNTARGETED_ICID = 0x10000 // 8 - 1  # a flat 64 KiB collection table holds 8192 ICIDs (8-byte entries)
PRIVATE_SIZE = HIDDEN_ITS_PRIVATE_SIZE
assert ITT_OFFSET + (8 << EVENT_BITS) <= PRIVATE_SIZE, "the hidden ITS's memory map does not fit its slot"
assert INJECTOR_FIRST_DEVID + NR_INJECTORS <= 0x10000 // 8, "the injectors do not fit the flat device table"


def injector_msi(intid: int) -> tuple[int, int]:
    """(DeviceID, EventID) of the hidden ITS's injector event for LPI `intid`: an MSI with
    these raises it, and the hidden ITS's commands for it name them."""
    n = intid - LPI_BASE
    return INJECTOR_FIRST_DEVID + (n >> INJECTOR_EVENT_BITS), n & (INJECTOR_EVENTS - 1)

_BASER_64K = GITS_BASER_VALID | PAGE_SIZE_ENCODING[0x10000] << GITS_BASER_PAGE_SIZE_SHIFT


class HiddenItsError(RuntimeError):
    """The hidden ITS did not do what the VMM asked (a kernel or kvmits bug, never the guest's)."""


class HiddenIts:
    """The delivery engine: an LPI sink driving a hidden in-kernel ITS.

    kernel_its: a kvmits.gic.KernelIts, base set and CTRL_INIT done.
    private: a GuestMemory of PRIVATE_SIZE bytes mapped into the VM (read-only for the guest).
    """

    def __init__(self, vm, kernel_its, private, nr_vcpus: int):
        if private.size < PRIVATE_SIZE:
            raise ValueError(f"the hidden ITS needs {PRIVATE_SIZE:#x} bytes of private memory")
        if nr_vcpus > UNTARGETED_ICID:
            raise ValueError(f"the hidden ITS maps ICIDs 0..{nr_vcpus - 1} and keeps {UNTARGETED_ICID} "
                             "unmapped: too many vCPUs")
        self.vm = vm
        self.kernel_its = kernel_its
        self.private = private
        self.nr_vcpus = nr_vcpus
        self.doorbell = kernel_its.doorbell
        self._cwriter = 0
        # KVM keeps ITEs in its own lists and touches an ITT only to save or restore the tables,
        # which the hidden ITS never does: the creator device can name the injector's ITT
        self._creator_mapd = cmd.encode_mapd(CREATOR_DEVID, private.gpa + ITT_OFFSET, EVENT_BITS)
        self._queue: list[bytes] = []
        self._batching = 0
        self._target: dict[int, int | None] = {}  # LPI -> vCPU KVM has it on (None: no target yet)
        self._refs: dict[int, int] = {}         # LPI -> number of guest ITEs naming it
        # statistics
        self.kicks = 0
        self.commands = 0
        self.injected = 0
        self.dropped = 0

    # -- set-up (before any vCPU runs, or paused) --------------------------------------------------
    def program(self) -> None:
        """Tables, queue, enable; then the injector and creator devices and one collection per
        vCPU (UNTARGETED_ICID is never mapped)."""
        p = self.private.gpa
        self.private.fill(p, PRIVATE_SIZE, 0)
        its = self.kernel_its
        its.set_reg(GITS_BASER(0), p + DT_OFFSET | _BASER_64K)
        its.set_reg(GITS_BASER(1), p + CT_OFFSET | _BASER_64K)
        its.set_reg(GITS_CBASER, p + CQ_OFFSET | GITS_CBASER_VALID | (CQ_SIZE // 0x1000 - 1))
        its.set_reg(GITS_CWRITER, 0)
        its.set_reg(GITS_CTLR, GITS_CTLR_ENABLED)
        if not its.get_reg(GITS_CTLR) & GITS_CTLR_ENABLED:
            raise HiddenItsError(f"the hidden ITS did not enable (GITS_BASER0={its.get_reg(GITS_BASER(0)):#x}, "
                                 f"GITS_CBASER={its.get_reg(GITS_CBASER):#x})")
        self._cwriter = its.get_reg(GITS_CWRITER)
        with self.batch():
            for k in range(NR_INJECTORS):
                self._queue.append(cmd.encode_mapd(INJECTOR_FIRST_DEVID + k, p + ITT_OFFSET + k * INJECTOR_ITT_SIZE,
                                                   INJECTOR_EVENT_BITS))
            self._queue.append(self._creator_mapd)
            for cpu in range(self.nr_vcpus):
                self._queue.append(cmd.encode_mapc(cpu, cpu))
            self._queue.append(cmd.encode_sync(0))
        self.flush()

    def reset(self) -> None:
        """Back to just after program(): KVM_DEV_ARM_ITS_CTRL_RESET (every mapping and pending
        LPI of the hidden ITS gone), then program() again. vCPUs paused."""
        self.kernel_its.ctrl_reset()
        self._queue.clear()
        self._target.clear()
        self._refs.clear()
        self.program()

    # -- batching ------------------------------------------------------------------------------
    @contextmanager
    def batch(self):
        """Queue sink calls instead of acting on them; flush() afterwards, with vCPUs paused."""
        self._batching += 1
        try:
            yield self
        finally:
            self._batching -= 1

    @property
    def dirty(self) -> bool:
        """Are there queued commands waiting for flush()?"""
        return bool(self._queue)

    def flush(self) -> int:
        """Run everything queued on the hidden ITS: one GITS_CWRITER write per queue-full.
        All vCPUs must be out of KVM_RUN. Returns the number of commands run."""
        done = 0
        slots = CQ_SIZE // 32 - 1                 # a full queue has CWRITER one slot behind CREADR
        while self._queue:
            chunk, self._queue = self._queue[:slots], self._queue[slots:]
            base = self.private.gpa + CQ_OFFSET
            for c in chunk:
                self.private.write(base + self._cwriter, c)
                self._cwriter = (self._cwriter + 32) % CQ_SIZE
            self.kernel_its.set_reg(GITS_CWRITER, self._cwriter)
            self.kicks += 1
            creadr = self.kernel_its.get_reg(GITS_CREADR)
            if creadr != self._cwriter:
                raise HiddenItsError(f"hidden ITS: GITS_CREADR {creadr:#x} != GITS_CWRITER {self._cwriter:#x} "
                                     "after the kick")
            done += len(chunk)
        self.commands += done
        return done

    def run(self, *commands: bytes) -> int:
        """Run raw ITS commands on the hidden ITS now, after anything queued (vCPUs out of
        KVM_RUN). Past the sink's bookkeeping: for probes of the kernel's ITS (its
        behaviour module) and experiments on a machine of one's own."""
        self._queue.extend(commands)
        return self.flush()

    def _emit(self, command: bytes) -> None:
        self._queue.append(command)

    # -- the LPI sink (kvmits.its.LpiSink) -------------------------------------------------------
    def set_pending(self, intid: int, target: int) -> None:
        if intid not in self._refs:
            # the model names only LPIs it told us of (mapped): a kvmits bug, not the guest's
            log.warning("hidden ITS: set_pending of LPI %d, which no ITE maps", intid)
            self.dropped += 1
            return
        if self._batching or self._queue:
            # inside command processing: in order with the MAPTI/MOVI queued before it. The LPI
            # becomes pending where KVM has it, which after a MOVALL (or for an LPI several ITEs
            # map, or one made without a target) is not the translation's `target`
            self._emit(cmd.encode_int(*injector_msi(intid)))
            return
        if self._target[intid] != target:
            # KVM keeps one target per LPI: after a MOVALL, or for an LPI several ITEs map, it
            # is not the translation's, and KVM delivers there (docs/introspection.md)
            log.debug("hidden ITS: LPI %d goes to vCPU %s where KVM has it; its translation says %d",
                      intid, self._target[intid], target)
        devid, event = injector_msi(intid)
        if self.vm.signal_msi(self.doorbell, event, devid=devid) == 1:
            self.injected += 1
        else:
            self.dropped += 1

    def clear_pending(self, intid: int, target: int) -> None:
        if intid in self._refs:
            self._emit(cmd.encode_clear(*injector_msi(intid)))

    def invalidate(self, intid: int, target: int) -> None:
        if intid in self._refs:
            self._emit(cmd.encode_inv(*injector_msi(intid)))

    def invalidate_all(self, target: int) -> None:
        self._emit(cmd.encode_invall(target))

    def move(self, intid: int, old_target: int, new_target: int) -> None:
        # Every update_affinity of the guest's ITS is one MOVI here, also to the target we think
        # the LPI has: KVM sets it unconditionally, and our idea of it can be stale (an LPI
        # re-mapped while KVM still held it queued keeps its old target; see `mapped`)
        if intid in self._refs:
            self._emit(cmd.encode_movi(*injector_msi(intid), new_target))
            self._target[intid] = new_target

    def move_all(self, old_target: int, new_target: int) -> None:
        self._emit(cmd.encode_movall(old_target, new_target))
        # KVM retargets every LPI on the old vCPU (not only the pending ones, and none without
        # a target) but leaves the ITEs' collections alone: such an LPI no longer goes where
        # its ITE says, until a MOVI or a MAPC of its collection moves it (move())
        for intid, target in self._target.items():
            if target == old_target:
                self._target[intid] = new_target

    def mapped(self, intid: int, target: int | None) -> None:
        refs = self._refs.get(intid, 0)
        self._refs[intid] = refs + 1
        if refs:
            return              # KVM's vgic_add_lpi hands back the existing interrupt, as it is
        devid, event = injector_msi(intid)
        if target is not None:
            self._emit(cmd.encode_mapti(devid, event, intid, target))
        else:
            # KVM makes the interrupt without a target vCPU: an INT or MSI then latches it
            # pending but queues it nowhere, and a later MOVI or MAPC gives it a target without
            # queueing it. The same here: the creator device's ITE, on a collection never
            # mapped, makes it; the injector's ITE finds it so and, its own collection mapped,
            # takes INT, CLEAR, INV, MOVI and DISCARD (which KVM refuses on an ITE whose
            # collection is unmapped); re-mapping the creator frees its ITE at once.
            self._emit(cmd.encode_mapti(CREATOR_DEVID, intid - LPI_BASE, intid, UNTARGETED_ICID))
            self._emit(cmd.encode_mapti(devid, event, intid, 0))
            self._emit(self._creator_mapd)
        self._target[intid] = target

    def unmapped(self, intid: int, target: int | None) -> None:
        refs = self._refs.get(intid, 0) - 1
        if refs > 0:
            self._refs[intid] = refs
            return
        if refs < 0:
            log.warning("hidden ITS: unmapped LPI %d, which no ITE maps", intid)
            return
        # the last ITE: KVM lets go of the interrupt, which lives on while a vCPU still has it
        # queued (pending) -- and so does the hidden one, whose DISCARD runs at the same point
        del self._refs[intid]
        self._target.pop(intid, None)
        self._emit(cmd.encode_discard(*injector_msi(intid)))

    # -- for routes and inspection ------------------------------------------------------------------
    def mapping(self) -> dict[int, int]:
        """LPI -> the vCPU KVM delivers it to (after flush()): where an MSI translating to it
        really goes. LPIs without a target (see `mapped`) are left out: they go nowhere."""
        return {intid: t for intid, t in self._target.items() if t is not None}
