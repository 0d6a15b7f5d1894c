"""The one shape of a machine's ITS, whichever implements it: `Machine.its`.

A machine created with its="kernel" or its="user" has one MachineIts; with its=None it has none
(Machine.its is None). The two implementations:

- KernelMachineIts (kvmits.machine.its.kernel): the in-kernel ITS (KVM_DEV_TYPE_ARM_VGIC_ITS) is
  the guest's ITS; kvmits reads it through device attributes, with the vCPUs paused;
- UserMachineIts (kvmits.machine.its.user): kvmits' Python model (kvmits.its.ItsModel) serves the
  guest's GITS_* frame on KVM_EXIT_MMIO and delivers through a hidden in-kernel ITS.

Everything above the machine (the control socket, the lab, the CLI, the benchmarks) talks to
this protocol only, never to what is behind it. The shape follows QEMU's split of its GICv3 ITS
into one common class with a KVM and an emulated implementation.

What both answer (the methods below), and how each answers it:

| call                 | kernel ITS                                   | userspace ITS                          |
|----------------------|----------------------------------------------|----------------------------------------|
| signal_msi           | KVM_SIGNAL_MSI to its GITS_TRANSLATER        | translated by the model, injected into |
|                      |                                              | the hidden ITS                         |
| set_msi_routes       | KVM routes (DeviceID, EventID) -> the ITS    | routes compiled from the translation   |
| reset                | KVM_DEV_ARM_ITS_CTRL_RESET                   | the model's reset and the hidden ITS's |
| snapshot / translate | decoded KVM_DEV_ARM_ITS_SAVE_TABLES          | the model, live                        |
| saved_tables         | KVM_DEV_ARM_ITS_SAVE_TABLES, decoded         | the model's save_tables(), decoded     |
| lpi_vcpu             | None: no interface reads it                  | the hidden ITS's record                |
| save_state           | KVM_DEV_ARM_ITS_SAVE_TABLES, GITS_* attrs    | the model's save_tables(), its GITS_*  |
| restore_state        | GITS_* attrs, KVM_DEV_ARM_ITS_RESTORE_TABLES | the model's restore_tables(), and the  |
|                      |                                              | hidden ITS rebuilt from the mappings   |

A saved ITS (save_state) is the same for both kinds, so either restores the other's: the tables
in guest RAM in KVM's ITS table ABI rev 0, and the GITS registers below. Pending LPIs are not
the ITS's: they travel in the redistributors' pending tables (kvmits.machine.state).
"""

from __future__ import annotations

import abc
from contextlib import AbstractContextManager
from typing import Callable, Mapping

from kvmits.errors import KvmitsError
from kvmits.its import abi
from kvmits.its.model import Translation
from kvmits.its.query import ItsSnapshot, translation_to_json
from kvmits.its.registers import (
    GITS_BASER, GITS_BASER_COUNT, GITS_CBASER, GITS_CREADR, GITS_CTLR, GITS_CWRITER, GITS_IIDR, GITS_TRANSLATER,
)

#: the GITS registers a saved ITS carries, in the order arm-vgic-its.rst ("ITS Restore Sequence")
#: restores them: GITS_IIDR first (it selects the table ABI), GITS_CBASER before GITS_CREADR (a
#: CBASER write resets CREADR), the GITS_BASER<n> before the tables are read back, and GITS_CTLR
#: last, after KVM_DEV_ARM_ITS_RESTORE_TABLES (enabling runs the commands still queued)
SAVED_REGISTERS: tuple[tuple[str, int], ...] = (
    ("GITS_IIDR", GITS_IIDR), ("GITS_CBASER", GITS_CBASER), ("GITS_CREADR", GITS_CREADR),
    ("GITS_CWRITER", GITS_CWRITER), *((f"GITS_BASER{n}", GITS_BASER(n)) for n in range(GITS_BASER_COUNT)),
    ("GITS_CTLR", GITS_CTLR),
)
ITS_STATE_FORMAT = "kvmits-its"
ITS_STATE_VERSION = 1


class ItsStateError(KvmitsError, ValueError):
    """A saved ITS state that cannot be restored: malformed, or refused by the ITS (the kernel's
    error or the model's, with the step that failed)."""


def parse_its_state(state) -> dict[str, int]:
    """The registers of a save_state() dict, validated: name -> value, every one of
    SAVED_REGISTERS present and a 64-bit integer. ItsStateError otherwise."""
    if not isinstance(state, dict) or state.get("format") != ITS_STATE_FORMAT:
        raise ItsStateError(f"ITS state: not a {ITS_STATE_FORMAT!r} dict")
    if state.get("version") != ITS_STATE_VERSION:
        raise ItsStateError(f"ITS state: version {state.get('version')!r}, this kvmits reads {ITS_STATE_VERSION}")
    regs = state.get("registers")
    if not isinstance(regs, dict):
        raise ItsStateError("ITS state: 'registers' missing")
    out = {}
    for name, _offset in SAVED_REGISTERS:
        value = regs.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise ItsStateError(f"ITS state: {name} must be a 64-bit integer, got {value!r}")
        out[name] = value
    return out


class NoItsError(KvmitsError):
    """The machine has no ITS (MachineConfig(its=None)): nothing to read."""


def require_its(machine) -> MachineIts:
    """`machine.its`, or NoItsError if the machine was created without one."""
    if machine.its is None:
        raise NoItsError("this machine has no ITS (it was created with its=None / --its none)")
    return machine.its


class MachineIts(abc.ABC):
    """The guest's ITS of one machine. `kind`: "kernel" or "user"; `base`: the guest-physical
    base of the 128 KiB GITS_* frame the guest is told about (device tree); `doorbell`: the
    guest-physical address of its GITS_TRANSLATER, where the guest's devices send MSIs."""

    kind: str
    base: int
    #: the MMIO device that serves the guest's GITS_* frame at `base` from userspace (the
    #: machine puts it on its bus), or None when KVM serves the frame
    frame_device = None
    #: translate() is the ITS's own live answer, with nothing stopped or written (True), or
    #: look-ups over a snapshot of its saved tables (False)
    live_translation: bool

    # -- bring-up, in the order KVM accepts -----------------------------------------------------------
    @staticmethod
    @abc.abstractmethod
    def create(vm, memmap):
        """Before the vGIC's KVM_DEV_ARM_VGIC_CTRL_INIT: the in-kernel ITS device this kind
        needs (kvmits.gic.KernelIts), its base set and initialised (arm-vgic-its.rst: an ITS
        must be initialised before the vGIC)."""

    @classmethod
    @abc.abstractmethod
    def attach(cls, vm, device, *, memmap, ram, vgic, mpidr: int, nr_vcpus: int,
               pause: Callable[[], AbstractContextManager], config=None, translater_devid: int = 0) -> MachineIts:
        """After the vGIC's init: the machine's ITS over `device` (what create() returned).
        `pause`: a context-manager factory holding every vCPU outside KVM_RUN; `vgic`, `mpidr`
        (vCPU 0's): where the LPI configuration is read; `config`, `translater_devid`: the
        userspace model's ItsConfig and the DeviceID of a CPU's GITS_TRANSLATER write."""

    @property
    def doorbell(self) -> int:
        return self.base + GITS_TRANSLATER

    # -- MSIs --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def signal_msi(self, devid: int, eventid: int) -> int:
        """An MSI of EventID `eventid` from DeviceID `devid`: 1 if delivered, 0 if it does not
        translate. KvmError(EBUSY) from the kernel's ITS while the guest has not enabled it.
        No pause needed."""

    @abc.abstractmethod
    def set_msi_routes(self, table: Mapping[tuple[int, int], int]) -> dict:
        """Replace the irqfd routing table: (DeviceID, EventID) -> GSI. Returns (DeviceID,
        EventID) -> EventFd; write(1) to one to send that MSI (kvmits.machine.its.routes)."""

    # -- state -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def reset(self) -> None:
        """The ITS's reset: every mapping and pending LPI of it gone, GITS_CTLR.Enabled = 0,
        GITS_BASER<n>/GITS_CBASER invalid. Pauses the vCPUs."""

    @abc.abstractmethod
    def snapshot(self) -> ItsSnapshot:
        """The mapping state now: devices, ITEs, collections (kvmits.its.query.ItsSnapshot)."""

    @abc.abstractmethod
    def translate(self, devid: int, eventid: int, snap: ItsSnapshot | None = None) -> Translation:
        """Where an MSI (devid, eventid) would go now, without sending it. `snap`: a snapshot
        the caller has just taken, for an implementation that answers from one."""

    @abc.abstractmethod
    def saved_tables(self) -> abi.TablesContent:
        """Write the ITS's tables into guest memory as KVM's ITS table ABI (rev 0) lays them
        out, where the guest's GITS_BASER<n> and MAPD ITT addresses point, and decode them: what a
        migration sees. What the ABI cannot express (orphaned ITEs) is missing on both."""

    @abc.abstractmethod
    def lpi_vcpu(self, intid: int) -> int | None:
        """The vCPU KVM has LPI `intid` on, where an MSI translating to it is delivered (KVM
        keeps one target per LPI: set by the first ITE that maps it, by MOVI and MAPC, moved by
        MOVALL without its ITEs); None where no interface tells."""

    @abc.abstractmethod
    def orphaned_ites(self) -> tuple[tuple[int, int], ...] | None:
        """(DeviceID, EventID) of the ITEs whose collection was unmapped; None where the ITS's
        state does not show them (the kernel's saved tables)."""

    @abc.abstractmethod
    def save_state(self) -> dict:
        """The ITS as a migration carries it, vCPUs paused by the caller: its tables written
        into guest RAM (table ABI rev 0; the caller copies RAM afterwards) and the GITS registers
        (SAVED_REGISTERS). JSON-able: {"format", "version", "kind", "registers": {name: value}}."""

    @abc.abstractmethod
    def restore_state(self, state: dict) -> None:
        """Apply a save_state() dict of either kind, on a machine no vCPU of which has run yet,
        after guest RAM and the redistributors (GICR_PROPBASER/PENDBASER, EnableLPIs) are back:
        the registers and the tables in SAVED_REGISTERS' order. ItsStateError naming the step
        if the state is malformed or the ITS refuses it."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters of the implementation's own cost (the userspace ITS's vCPU stops, hidden
        ITS kicks, slow-path MSIs); empty for the kernel's ITS."""

    # -- lifetime ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def detach(self) -> None:
        """Before the VM closes: irqfds and threads."""

    @abc.abstractmethod
    def close(self) -> None:
        """After the VM closed: what is left (memory behind slots)."""

    # -- built on the calls above ------------------------------------------------------------------
    def _state(self, registers: Mapping[str, int]) -> dict:
        return {"format": ITS_STATE_FORMAT, "version": ITS_STATE_VERSION, "kind": self.kind,
                "registers": {name: registers[name] for name, _offset in SAVED_REGISTERS}}

    def translation_report(self, devid: int, eventid: int) -> dict:
        """translate() as `kvmits its translate` reports it: the Translation as JSON, which ITS
        answered ("its"), the other (DeviceID, EventID) mapping the same LPI ("shared_with"),
        and the vCPU KVM has that LPI on ("lpi_vcpu", see lpi_vcpu()): an MSI can reach another
        vCPU than its translation names (ItsSnapshot.lpi_users)."""
        snap = self.snapshot()
        result = self.translate(devid, eventid, snap)
        if not result.ok:
            return dict(translation_to_json(result), its=self.kind, shared_with=[], lpi_vcpu=None)
        shared = [[d, e] for d, e in snap.lpi_users(result.intid) if (d, e) != (devid, eventid)]
        return dict(translation_to_json(result), its=self.kind, shared_with=shared,
                    lpi_vcpu=self.lpi_vcpu(result.intid))
