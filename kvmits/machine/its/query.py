"""Reading a running machine's ITS, whichever it is: snapshots of its mappings, saved tables, and
translation queries (what (LPI, vCPU) an MSI would reach).

- The kernel's ITS: all vCPUs are paused (every ITS attribute access needs them out of
  KVM_RUN), KVM_DEV_ARM_ITS_SAVE_TABLES writes its device table, ITTs and collection table
  into the guest memory the guest gave it (GITS_BASER<n>, the ITT addresses of MAPD: memory the
  architecture reserves to the ITS, IHI 0069 5.2), and kvmits.its.abi decodes them. This is how a
  VMM migrates the ITS; it changes nothing the guest may rely on.
- kvmits' userspace ITS: the model is read under its frame lock, without stopping the guest
  and without writing guest memory; translations are the model's own live answer.
"""

from __future__ import annotations

from kvmits.errors import KvmitsError
from kvmits.gic.regs import GITS_BASER, GITS_CTLR
from kvmits.its import abi
from kvmits.its.model import Translation
from kvmits.its.query import SOURCE_SAVE_TABLES, ItsSnapshot, model_snapshot, translation_to_json
from kvmits.its.registers import GITS_CTLR_ENABLED


class NoItsError(KvmitsError):
    """The machine has no ITS (MachineConfig(its=None)): nothing to read."""


def its_kind(machine) -> str:
    """"kernel" or "user": which ITS the guest sees."""
    if machine.user_its is not None:
        return "user"
    if machine.its is not None:
        return "kernel"
    raise NoItsError("this machine has no ITS (it was created with its=None / --its none)")


def _save_kernel_tables(machine) -> tuple[abi.TablesContent, bool]:
    """KVM_DEV_ARM_ITS_SAVE_TABLES with the vCPUs paused, decoded; and GITS_CTLR.Enabled."""
    with machine.paused():
        enabled = bool(machine.its.get_reg(GITS_CTLR) & GITS_CTLR_ENABLED)
        machine.its.save_tables()
        baser0 = machine.its.get_reg(GITS_BASER(0))
        baser1 = machine.its.get_reg(GITS_BASER(1))
    return abi.read_tables(machine.ram, baser0, baser1, nr_vcpus=machine.config.cpus), enabled


def saved_tables(machine) -> abi.TablesContent:
    """Save the ITS's tables into guest memory and decode them (ABI rev 0): the kernel's ITS with
    KVM_DEV_ARM_ITS_SAVE_TABLES, the model with its save_tables(). One path for both, as a
    migration sees them (the differential check compares these)."""
    if its_kind(machine) == "kernel":
        return _save_kernel_tables(machine)[0]
    with machine.user_its.frame.lock:
        model = machine.user_its.model
        model.save_tables()
        baser0 = model.mmio_read(GITS_BASER(0), 8)
        baser1 = model.mmio_read(GITS_BASER(1), 8)
    return abi.read_tables(machine.ram, baser0, baser1, nr_vcpus=machine.config.cpus)


def snapshot(machine) -> ItsSnapshot:
    """The guest's ITS's mapping state now (see the module's docstring for how it is read)."""
    if its_kind(machine) == "user":
        with machine.user_its.frame.lock:
            return model_snapshot(machine.user_its.model)
    content, enabled = _save_kernel_tables(machine)
    return ItsSnapshot("kernel", SOURCE_SAVE_TABLES, enabled, content.dump,
                       content.unmapped_collections, None)


def translate(machine, devid: int, eventid: int, snap: ItsSnapshot | None = None) -> Translation:
    """Where an MSI (devid, eventid) would go now: the model's live answer for the userspace
    ITS; for the kernel's ITS, the same look-ups over its saved tables (ItsSnapshot.translate),
    from `snap` if the caller has just taken one."""
    if its_kind(machine) == "user":
        with machine.user_its.frame.lock:
            return machine.user_its.model.translate(devid, eventid)
    return (snap or snapshot(machine)).translate(devid, eventid)


def translate_json(machine, devid: int, eventid: int) -> dict:
    """translate() as `kvmits its translate` reports it: the Translation as JSON, which ITS
    answered ("its"), the other (DeviceID, EventID) mapping the same LPI ("shared_with"), and
    the vCPU KVM has that LPI on ("lpi_vcpu"). KVM keeps one target per LPI: set by the first
    ITE that maps it, by MOVI and MAPC, and moved by MOVALL without its ITEs, so an MSI can
    reach another vCPU than its translation names (ItsSnapshot.lpi_users). The userspace ITS's
    hidden ITS tracks it (HiddenIts.mapping); for the kernel's ITS no interface reads it: None."""
    snap = snapshot(machine)
    result = translate(machine, devid, eventid, snap)
    lpi_vcpu = None
    if snap.its == "user" and result.ok:
        with machine.user_its.frame.lock:
            lpi_vcpu = machine.user_its.engine.mapping().get(result.intid)
    shared = [[d, e] for d, e in snap.lpi_users(result.intid) if (d, e) != (devid, eventid)] if result.ok else []
    return dict(translation_to_json(result), its=snap.its, shared_with=shared, lpi_vcpu=lpi_vcpu)
