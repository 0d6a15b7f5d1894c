"""A whole machine's state out and in (issue 13): what a snapshot file or a migration carries.

    m.quiesce()                             # vCPUs and device threads
    state = capture(m)                      # views into m's RAM: valid while m is paused, unclosed
    write_snapshot(path, state.meta, state.sections, state.ram)
    m.unquiesce()
    m2 = restore(state, its="user")         # a new VM, either ITS kind; then m2.start()

capture() takes, with every vCPU outside KVM_RUN, in the order the kernel documents
(Documentation/virt/kvm/devices/arm-vgic-its.rst, "ITS Restore Sequence"; arm-vgic-v3.rst):

1. KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES: every LPI's pending bit into the redistributors' pending
   tables in guest RAM (with the userspace ITS, the hidden ITS's LPIs are the guest's: the same
   INTIDs on the same vCPUs), and the ITS (MachineIts.save_state: its tables into guest RAM in the
   table ABI, and its GITS registers). Both write guest RAM, so they come before RAM is copied.
2. Every vCPU: each register KVM_GET_REG_LIST names (core, FP/SIMD, system registers, the timers
   with the virtual counter, the firmware pseudo-registers), by KVM_GET_ONE_REG; its MP state.
3. The vGICv3: the Distributor's SPI registers; each redistributor addressed by its own vCPU's
   MPIDR (GICR_PROPBASER/PENDBASER are per redistributor: cloud-hypervisor once saved vCPU 0's
   for all and lost LPIs); each CPU interface's ICC_* registers; the SPIs' line levels.
4. The devices: the PL011, the agent's mailbox, each PCI function (config space, MSI-X, the
   virtio registers and queue cursors, the device's own; kvmits.machine.devices.virtio.pci),
   with its device thread paused (Machine.quiesce: the request in flight completes first).
   A disk's contents are its file's, not the state's: the destination opens the same file.
5. Guest RAM (the caller copies or writes it: MachineState.ram).

restore() builds a new Machine with the saved configuration (only the ITS kind may change) and
applies the state before any vCPU runs: RAM; vCPUs; the Distributor; the redistributors
(GICR_PROPBASER and PENDBASER before GICR_CTLR.EnableLPIs, which the spec ignores them after);
the CPU interfaces (ICC_SRE_EL1 and ICC_CTLR_EL1 first: the others' layout depends on them);
line levels; the ITS (registers, tables, GITS_CTLR last); the devices (a PCI function's MSI-X
vectors routed through the restored ITS, then its BARs mapped: the queues' ioeventfds). An LPI the ITS creates
then takes its pending bit from the pending table (KVM: vgic_add_lpi reads it), which is how
pending LPIs survive, whichever ITS created them before. Anything refused closes the new
machine and raises MachineStateError: nothing half-restored runs.

The virtual counter is restored to its saved value, so guest time stands still while the VM is
not running rather than jumping (the time a VMM's downtime takes does not show in the guest).

Once the new vCPUs run, every active virtqueue gets one used-buffer interrupt and one
notification (Machine.start, VirtioPciFunction.resume_queues): an MSI whose irqfd injection
KVM had deferred, or a notification the source's device thread had taken but not served, is not
lost; a spurious one is harmless to the driver and the device.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

from kvmits.errors import KvmError, KvmitsError
from kvmits.gic.regs import (
    GICD_CTLR, GICD_ICFGR, GICD_IGROUPR, GICD_IPRIORITYR, GICD_IROUTER, GICD_ISACTIVER, GICD_ISENABLER,
    GICD_ISPENDR, GICR_CTLR, GICR_ICFGR0, GICR_ICFGR1, GICR_IGROUPR0, GICR_IPRIORITYR, GICR_ISACTIVER0,
    GICR_ISENABLER0, GICR_ISPENDR0, GICR_PENDBASER, GICR_PROPBASER, ICC_AP0R0_EL1, ICC_AP0R1_EL1, ICC_AP0R2_EL1,
    ICC_AP0R3_EL1, ICC_AP1R0_EL1, ICC_AP1R1_EL1, ICC_AP1R2_EL1, ICC_AP1R3_EL1, ICC_BPR0_EL1, ICC_BPR1_EL1,
    ICC_CTLR_EL1, ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1, ICC_PMR_EL1, ICC_SRE_EL1,
)
from kvmits.machine.its.interface import ItsStateError
from kvmits.machine.snapshot import PAGE, Snapshot, SnapshotInfo, nonzero_runs, read_snapshot, write_snapshot

log = logging.getLogger(__name__)

STATE_FORMAT = "kvmits-machine"
STATE_VERSION = 1
#: the MachineConfig fields a state carries (its_config is the destination's: the model makes the
#: choices of the running kernel's ITS, or the caller's)
CONFIG_FIELDS = ("cpus", "mem_size", "its", "nr_irqs", "agent", "translater_devid", "disks", "rng")
SECTIONS = ("vcpus", "gic", "its", "devices")

#: ICC_* registers in the order they are restored (QEMU's order too): SRE (system register
#: access, which the rest needs), CTLR (it fixes the priority bits, hence how many APRs exist),
#: the group enables, priority mask, binary points, then the active priorities
CPU_SYSREGS = (ICC_SRE_EL1, ICC_CTLR_EL1, ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1, ICC_PMR_EL1, ICC_BPR0_EL1,
               ICC_BPR1_EL1, ICC_AP0R0_EL1, ICC_AP0R1_EL1, ICC_AP0R2_EL1, ICC_AP0R3_EL1, ICC_AP1R0_EL1,
               ICC_AP1R1_EL1, ICC_AP1R2_EL1, ICC_AP1R3_EL1)
_SYSREG_BY_NAME = {r.name: r for r in CPU_SYSREGS}
#: the SGI/PPI registers of a redistributor's SGI_base frame, restored in this order: group and
#: configuration before the enable, pending and active bits they qualify
REDIST_SGI_REGS = (("GICR_IGROUPR0", GICR_IGROUPR0), ("GICR_ICFGR0", GICR_ICFGR0), ("GICR_ICFGR1", GICR_ICFGR1),
                   *((f"GICR_IPRIORITYR{n}", GICR_IPRIORITYR + 4 * n) for n in range(8)),
                   ("GICR_ISENABLER0", GICR_ISENABLER0), ("GICR_ISPENDR0", GICR_ISPENDR0),
                   ("GICR_ISACTIVER0", GICR_ISACTIVER0))


class MachineStateError(KvmitsError):
    """A machine that cannot be saved now, or a state that cannot be restored: says what and why."""


@dataclass
class MachineState:
    """A captured machine: `meta` (format, version, the configuration, where it was taken),
    `sections` (SECTIONS, each JSON-able) and `ram`: (guest-physical address, bytes-like) per
    RAM region. A capture's `ram` are views into the source's RAM; a file's are read by
    `load_ram(write)`, which calls write(gpa, data) for every stored (non-zero) run."""

    meta: dict
    sections: dict
    ram: list = field(default_factory=list)
    load_ram: Callable[[Callable[[int, bytes], None]], int] | None = None
    #: (gpa, size) of each RAM region the file holds (with load_ram)
    ram_regions: list = field(default_factory=list)

    def config(self, **overrides) -> dict:
        return dict(self.meta["config"], **overrides)


# -- the registers a state carries, per part -------------------------------------------------------
def dist_registers(nr_irqs: int) -> list[tuple[str, int]]:
    """(name, offset) of every 32-bit Distributor word a state carries, in restore order: the
    SPIs' group, configuration, priority, routing (GICD_IROUTER<n> as its two words), then their
    enable, pending and active bits, and GICD_CTLR last. SGIs and PPIs are the redistributors'
    (with affinity routing, the Distributor's copies of them are RAZ/WI: IHI 0069 12.9)."""
    words = range(1, nr_irqs // 32)
    regs = [(f"GICD_IGROUPR{i}", GICD_IGROUPR + 4 * i) for i in words]
    regs += [(f"GICD_ICFGR{i}", GICD_ICFGR + 4 * i) for i in range(2, nr_irqs // 16)]
    regs += [(f"GICD_IPRIORITYR{i}", GICD_IPRIORITYR + 4 * i) for i in range(8, nr_irqs // 4)]
    for n in range(32, nr_irqs):
        regs += [(f"GICD_IROUTER{n}.lo", GICD_IROUTER + 8 * n), (f"GICD_IROUTER{n}.hi", GICD_IROUTER + 8 * n + 4)]
    for name, base in (("ISENABLER", GICD_ISENABLER), ("ISPENDR", GICD_ISPENDR), ("ISACTIVER", GICD_ISACTIVER)):
        regs += [(f"GICD_{name}{i}", base + 4 * i) for i in words]
    regs.append(("GICD_CTLR", GICD_CTLR))
    return regs


# -- capture ---------------------------------------------------------------------------------------
def capture(machine) -> MachineState:
    """The state of `machine`, whose vCPUs and device threads the caller holds paused
    (Machine.quiesce(); Machine.paused() for a machine without PCI devices) until it is done
    with the result (its RAM views). MachineStateError if the machine cannot be saved now."""
    if not machine.quiesced:
        raise MachineStateError("capture() needs every vCPU and device thread paused (Machine.quiesce())")
    cfg = machine.config
    for vcpu in machine.vcpus:
        _complete_pending_exit(vcpu)
    try:
        devices = {"pl011": machine.uart.save_state()}
        if machine.agent is not None:
            devices["agent"] = machine.agent.mailbox.save_state()
    except (KvmitsError, ValueError) as e:      # RX bytes past a state's bound; a busy or panicked agent
        raise MachineStateError(f"the devices cannot be saved now: {e}") from e
    if machine.pci_devices:
        devices["pci"] = {name: entry.function.save_state() for name, entry in machine.pci_devices.items()}
    started = time.monotonic()
    gic = machine.gic
    its_state = None
    try:
        gic.save_pending_tables()
        if machine.its is not None:
            its_state = machine.its.save_state()
    except KvmError as e:
        raise MachineStateError(f"saving the interrupt state failed: {e}") from e
    sections = {
        "vcpus": [_save_vcpu(v) for v in machine.vcpus],
        "gic": _save_gic(gic, machine.mpidrs, cfg.nr_irqs),
        "its": its_state,
        "devices": devices,
    }
    meta = {
        "format": STATE_FORMAT, "version": STATE_VERSION,
        "config": {name: [list(d) for d in cfg.disks] if name == "disks" else getattr(cfg, name)
                   for name in CONFIG_FIELDS},
        "mpidrs": list(machine.mpidrs),
        "taken": {"host": platform.node(), "kernel": platform.release(), "time": time.time(), "pid": os.getpid()},
    }
    log.info("captured %d vCPUs, vGIC and %s ITS in %.3f s", len(machine.vcpus), cfg.its, time.monotonic() - started)
    return MachineState(meta, sections, [(machine.ram.gpa, machine.ram.view)])


def _complete_pending_exit(vcpu) -> None:
    """Enter KVM_RUN once with immediate_exit set: KVM finishes the operation of the last exit
    (an MMIO read's destination register, the PC step past the access) and returns EINTR
    before running any guest instruction. api.rst (KVM_RUN, "immediate_exit"): the pending
    state of an exit is not visible to userspace until then, so a VMM completes it before it
    saves a vCPU. The vCPU is paused (its thread parked, immediate_exit already set)."""
    vcpu.immediate_exit = 1
    ex = vcpu.run()
    if ex is not vcpu.INTR:
        raise MachineStateError(f"vCPU {vcpu.index}: KVM_RUN with immediate_exit set returned {ex!r}, not EINTR")


def _save_vcpu(vcpu) -> dict:
    regs = [[reg_id, vcpu.get_reg_bytes(reg_id).hex()] for reg_id in vcpu.reg_list()]
    return {"regs": regs, "mp_state": vcpu.get_mp_state()}


def _save_gic(gic, mpidrs, nr_irqs: int) -> dict:
    dist = {name: gic.get_dist_reg(offset) for name, offset in dist_registers(nr_irqs)}
    redists, cpus = [], []
    for mpidr in mpidrs:
        r = {"GICR_PROPBASER": gic.get_redist_reg64(mpidr, GICR_PROPBASER),
             "GICR_PENDBASER": gic.get_redist_reg64(mpidr, GICR_PENDBASER),
             "GICR_CTLR": gic.get_redist_reg(mpidr, GICR_CTLR)}
        r.update((name, gic.get_redist_reg(mpidr, offset)) for name, offset in REDIST_SGI_REGS)
        redists.append(r)
        sysregs = {}
        for reg in CPU_SYSREGS:
            try:
                sysregs[reg.name] = gic.get_cpu_sysreg(mpidr, reg)
            except KvmError as e:
                # ICC_AP0R<n>/AP1R<n> beyond what the priority bits need do not exist (EINVAL)
                if e.errno != errno.EINVAL or reg.name == ICC_CTLR_EL1.name:
                    raise
        cpus.append(sysregs)
    levels = {str(i): gic.get_line_levels(mpidrs[0], i) for i in range(32, nr_irqs, 32)}
    return {"dist": dist, "redist": redists, "cpu": cpus, "line_levels": levels}


def save_file(machine, path) -> SnapshotInfo:
    """Pause `machine`, capture it and write the snapshot file `path` (kvmits.machine.snapshot);
    it resumes afterwards."""
    machine.quiesce()
    try:
        state = capture(machine)
        return write_snapshot(path, state.meta, state.sections, state.ram)
    finally:
        machine.unquiesce()


def read_file(path) -> tuple[MachineState, Snapshot]:
    """The MachineState of snapshot file `path` (its RAM read by load_ram when restored) and the
    open Snapshot (close it after the restore). SnapshotError for a damaged file,
    MachineStateError for a file that is not a machine's state."""
    snap = read_snapshot(path)
    try:
        state = MachineState(snap.meta, {k: v for k, v in snap.sections.items()}, load_ram=snap.load_ram,
                             ram_regions=list(snap.ram_regions))
        check_state(state)
    except BaseException:
        snap.close()
        raise
    return state, snap


# -- restore ---------------------------------------------------------------------------------------
def check_state(state: MachineState) -> None:
    """The structure restore() relies on, before anything is built. MachineStateError if not."""
    meta = state.meta
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise MachineStateError(f"not a {STATE_FORMAT!r} state")
    if meta.get("version") != STATE_VERSION:
        raise MachineStateError(f"machine state version {meta.get('version')!r}, this kvmits reads {STATE_VERSION}")
    config = meta.get("config")
    if not isinstance(config, dict) or set(config) != set(CONFIG_FIELDS):
        raise MachineStateError(f"machine state: config must have exactly {CONFIG_FIELDS}")
    missing = [s for s in SECTIONS if s not in state.sections]
    if missing:
        raise MachineStateError(f"machine state: sections {missing} missing")
    vcpus = state.sections["vcpus"]
    if not isinstance(vcpus, list) or len(vcpus) != config["cpus"]:
        raise MachineStateError(f"machine state: {config['cpus']} vCPUs configured, "
                                f"{len(vcpus) if isinstance(vcpus, list) else 'no list of'} saved")
    for i, v in enumerate(vcpus):
        if not (isinstance(v, dict) and isinstance(v.get("regs"), list) and isinstance(v.get("mp_state"), int)
                and all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], str)
                        for r in v["regs"])):
            raise MachineStateError(f"machine state: vCPU {i} is malformed")
    gic = state.sections["gic"]
    if not (isinstance(gic, dict) and isinstance(gic.get("dist"), dict) and isinstance(gic.get("redist"), list)
            and isinstance(gic.get("cpu"), list) and len(gic["redist"]) == len(gic["cpu"]) == config["cpus"]
            and isinstance(gic.get("line_levels"), dict)):
        raise MachineStateError("machine state: the vGIC section is malformed")
    if (state.sections["its"] is None) != (config["its"] is None):
        raise MachineStateError("machine state: the ITS section does not match the configuration")
    devices = state.sections["devices"]
    if not isinstance(devices, dict) or "pl011" not in devices or ("agent" in devices) != bool(config["agent"]) \
            or ("pci" in devices) != bool(config["disks"] or config["rng"]):
        raise MachineStateError("machine state: the devices section does not match the configuration")


def restore(state: MachineState, *, its: str | None = None, console=None, kvm=None, expect: dict | None = None,
            ram=None):
    """A new, not yet started Machine holding `state`; `its`: the ITS kind to restore into (default:
    the saved one; either kind restores the other's state). `expect`: configuration values the
    caller requires (e.g. {"cpus": 4}): a state that differs is refused, naming the field.
    `ram`: the GuestMemory the state's RAM views are of (the paused source's), adopted by the new
    machine instead of copied (Machine(ram=)); the caller must then not close it (the source
    hands it over: kvmits.machine.migration). Call start() on the result to resume the guest."""
    from kvmits.machine.machine import Machine, MachineConfig       # restore builds a Machine

    check_state(state)
    saved = state.meta["config"]
    for name, want in (expect or {}).items():
        if name in saved and saved[name] != want:
            raise MachineStateError(f"the state has {name} = {saved[name]!r}, not {want!r} as asked")
    kind = saved["its"] if its is None else its
    if (kind is None) != (saved["its"] is None):
        raise MachineStateError(f"the state was saved with ITS {saved['its']!r}: it cannot restore with {kind!r}")
    config = MachineConfig(**dict(saved, its=kind))
    machine = Machine(config, console=console, kvm=kvm, ram=ram)
    try:
        if list(machine.mpidrs) != state.meta.get("mpidrs"):
            raise MachineStateError(f"this KVM gives the vCPUs MPIDRs {[hex(m) for m in machine.mpidrs]}, "
                                    f"the state has {state.meta.get('mpidrs')}")
        apply(machine, state, ram_adopted=ram is not None)
    except BaseException:
        if ram is not None:
            machine.ram = None                # the source's still: not the failed machine's to close
        machine.close()
        raise
    return machine


def apply(machine, state: MachineState, *, ram_adopted: bool = False) -> None:
    """Restore `state` into `machine` (new, never started; same configuration but the ITS kind).
    `ram_adopted`: the machine's RAM is the state's own (nothing to copy)."""
    started = time.monotonic()
    ram = machine.ram
    if ram_adopted:
        pass
    elif state.load_ram is not None:
        if [tuple(r) for r in state.ram_regions] != [(ram.gpa, ram.size)]:
            raise MachineStateError(f"the file's RAM regions {[(hex(g), hex(n)) for g, n in state.ram_regions]} "
                                    f"are not this machine's RAM ({ram.gpa:#x}, {ram.size:#x})")
        state.load_ram(ram.write)
    else:
        for gpa, data in state.ram:
            if not ram.contains(gpa, len(data)):
                raise MachineStateError(f"saved RAM [{gpa:#x}, {gpa + len(data):#x}) is not this machine's RAM")
            _copy_nonzero(ram, gpa, data)
    step = "the vCPUs"
    try:
        for vcpu, saved in zip(machine.vcpus, state.sections["vcpus"]):
            step = f"vCPU {vcpu.index}'s registers"
            for reg_id, value in saved["regs"]:
                vcpu.set_reg_bytes(reg_id, bytes.fromhex(value))
            step = f"vCPU {vcpu.index}'s MP state"
            vcpu.set_mp_state(saved["mp_state"])
        step = "the vGIC"
        _restore_gic(machine.gic, machine.mpidrs, machine.config.nr_irqs, state.sections["gic"])
    except (KvmError, ValueError, KeyError, TypeError) as e:
        raise MachineStateError(f"restoring {step} failed: {e!r}") from e
    if machine.its is not None:
        try:
            machine.its.restore_state(state.sections["its"])
        except ItsStateError as e:
            raise MachineStateError(str(e)) from e
    devices = state.sections["devices"]
    try:
        machine.uart.load_state(devices["pl011"])
        if machine.agent is not None:
            machine.agent.mailbox.load_state(devices["agent"])
        _restore_pci(machine, devices.get("pci", {}))
    except (KvmitsError, ValueError) as e:
        raise MachineStateError(f"restoring the devices failed: {e}") from e
    machine.restored = True
    log.info("restored %d vCPUs, vGIC and %s ITS in %.3f s", len(machine.vcpus), machine.config.its,
             time.monotonic() - started)


def _restore_pci(machine, saved) -> None:
    """Each PCI function's state (VirtioPciFunction.load_state: its MSI-X vectors are routed
    through the ITS restored before), then its BARs mapped where the guest had them, which
    assigns the queues' ioeventfds. start() then resumes the queues (Machine.start)."""
    if not isinstance(saved, dict) or set(saved) != set(machine.pci_devices):
        raise ValueError(f"the state has PCI devices {sorted(saved) if isinstance(saved, dict) else saved!r}, "
                         f"this machine {sorted(machine.pci_devices)}")
    for name, entry in machine.pci_devices.items():
        try:
            entry.function.load_state(saved[name])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        machine.pci.reload(entry.devid)


def _copy_nonzero(ram, gpa: int, data) -> None:
    """Copy only the non-zero runs of `data` to `gpa`: the new RAM is zero, and writing zeros
    would make the host back every page of it while the source still holds its own. (A function
    of its own: the views it makes of the source's RAM end with it, so that no traceback of a
    later restore step keeps them, which would stop the source's RAM from being unmapped.)"""
    base = gpa - ram.gpa
    with memoryview(data) as src:
        for first, count in nonzero_runs(src):
            lo, hi = first * PAGE, (first + count) * PAGE
            ram.view[base + lo:base + hi] = src[lo:hi]


def _restore_gic(gic, mpidrs, nr_irqs: int, saved: dict) -> None:
    dist = saved["dist"]
    for name, offset in dist_registers(nr_irqs):
        gic.set_dist_reg(offset, dist[name])
    for mpidr, r in zip(mpidrs, saved["redist"]):
        gic.set_redist_reg64(mpidr, GICR_PROPBASER, r["GICR_PROPBASER"])
        gic.set_redist_reg64(mpidr, GICR_PENDBASER, r["GICR_PENDBASER"])
        for name, offset in REDIST_SGI_REGS:
            gic.set_redist_reg(mpidr, offset, r[name])
        gic.set_redist_reg(mpidr, GICR_CTLR, r["GICR_CTLR"])        # EnableLPIs after the BASERs
    for mpidr, sysregs in zip(mpidrs, saved["cpu"]):
        for name, value in sysregs.items():
            if name not in _SYSREG_BY_NAME:
                raise ValueError(f"unknown CPU interface register {name!r}")
        for reg in CPU_SYSREGS:
            if reg.name in sysregs:
                gic.set_cpu_sysreg(mpidr, reg, sysregs[reg.name])
    for intid, levels in saved["line_levels"].items():
        gic.set_line_levels(mpidrs[0], int(intid), levels)
