"""The kernel's ITS as a machine's ITS: a KVM_DEV_TYPE_ARM_VGIC_ITS the guest is told about.

Reading it: every ITS attribute access needs all vCPUs out of KVM_RUN, so each read pauses
them; KVM_DEV_ARM_ITS_SAVE_TABLES writes the device table, the ITTs and the collection table
into the guest memory the guest gave the ITS (GITS_BASER<n>, the ITT addresses of MAPD: memory
the architecture reserves to the ITS, IHI 0069 5.2), and kvmits.its.abi decodes them. That is
how a VMM migrates the ITS; it changes nothing the guest may rely on. MSIs need no pause.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Mapping

from kvmits.gic import KernelIts
from kvmits.its import abi
from kvmits.its.model import Translation
from kvmits.its.query import SOURCE_SAVE_TABLES, ItsSnapshot
from kvmits.its.registers import GITS_BASER, GITS_CTLR, GITS_CTLR_ENABLED
from kvmits.errors import KvmError
from kvmits.machine.its.interface import SAVED_REGISTERS, ItsStateError, MachineIts, parse_its_state
from kvmits.machine.its.routes import MsiRoutes


class KernelMachineIts(MachineIts):
    """`device`: a kvmits.gic.KernelIts, base set and KVM_DEV_ARM_VGIC_CTRL_INIT done (create()
    does both; it must come before the vGIC's own CTRL_INIT). `ram`: the guest RAM the tables
    are saved into; `pause`: a context-manager factory holding every vCPU outside KVM_RUN."""

    kind = "kernel"
    live_translation = False

    def __init__(self, vm, device: KernelIts, ram, nr_vcpus: int,
                 pause: Callable[[], AbstractContextManager]):
        self.vm = vm
        self.device = device
        self.base = device.base
        self.ram = ram
        self.nr_vcpus = nr_vcpus
        self.pause = pause
        self.routes = MsiRoutes(vm, self.doorbell)
        #: called after each KVM_SIGNAL_MSI with (devid, eventid, what KVM returned)
        #: (kvmits.machine.trace); empty unless someone traces
        self.signal_observers: list[Callable[[int, int, int], None]] = []

    @staticmethod
    def create(vm, memmap) -> KernelIts:
        """The in-kernel ITS at the guest's ITS address, initialised."""
        return KernelIts.initialised(vm, memmap.its.base)

    @classmethod
    def attach(cls, vm, device: KernelIts, *, memmap, ram, vgic, mpidr: int, nr_vcpus: int,
               pause: Callable[[], AbstractContextManager], config=None,
               translater_devid: int = 0) -> KernelMachineIts:
        # KVM's ITS has no model configuration, and a CPU cannot write its GITS_TRANSLATER
        # with a DeviceID of its choosing: `config` and `translater_devid` do not apply
        return cls(vm, device, ram, nr_vcpus, pause)

    def signal_msi(self, devid: int, eventid: int) -> int:
        delivered = self.vm.signal_msi(self.doorbell, eventid, devid=devid)
        if self.signal_observers:
            for fn in self.signal_observers:
                fn(devid, eventid, delivered)
        return delivered

    def set_msi_routes(self, table: Mapping[tuple[int, int], int]) -> dict:
        return self.routes.set(table)

    def reset(self) -> None:
        with self.pause():
            self.device.ctrl_reset()

    def _save(self) -> tuple[abi.TablesContent, bool]:
        """KVM_DEV_ARM_ITS_SAVE_TABLES with the vCPUs paused, decoded; and GITS_CTLR.Enabled."""
        with self.pause():
            enabled = bool(self.device.get_reg(GITS_CTLR) & GITS_CTLR_ENABLED)
            self.device.save_tables()
            baser0 = self.device.get_reg(GITS_BASER(0))
            baser1 = self.device.get_reg(GITS_BASER(1))
        return abi.read_tables(self.ram, baser0, baser1, nr_vcpus=self.nr_vcpus), enabled

    def saved_tables(self) -> abi.TablesContent:
        return self._save()[0]

    def snapshot(self) -> ItsSnapshot:
        content, enabled = self._save()
        return ItsSnapshot(self.kind, SOURCE_SAVE_TABLES, enabled, content.dump, content.unmapped_collections, None)

    def translate(self, devid: int, eventid: int, snap: ItsSnapshot | None = None) -> Translation:
        # KVM has no translation query: the same look-ups over its saved tables
        return (snap or self.snapshot()).translate(devid, eventid)

    def lpi_vcpu(self, intid: int) -> int | None:
        return None          # KVM keeps it in its vgic_irq; no attribute reads it

    def orphaned_ites(self) -> None:
        return None          # the saved tables do not show them (abi: an orphan saves as no ITE)

    def save_state(self) -> dict:
        # SAVE_TABLES first: it writes guest RAM, which the caller copies after this returns
        self.device.save_tables()
        return self._state({name: self.device.get_reg(offset) for name, offset in SAVED_REGISTERS})

    def restore_state(self, state: dict) -> None:
        regs = parse_its_state(state)
        # GITS_CREADR's bit 0 (Stalled) is not an offset: KVM's uaccess takes the offset only
        steps = [(name, offset, regs[name]) for name, offset in SAVED_REGISTERS if name != "GITS_CTLR"]
        try:
            for name, offset, value in steps:
                step = f"{name} = {value:#x}"
                self.device.set_reg(offset, value)
            step = "KVM_DEV_ARM_ITS_RESTORE_TABLES"
            self.device.restore_tables()
            step = f"GITS_CTLR = {regs['GITS_CTLR']:#x}"
            self.device.set_reg(GITS_CTLR, regs["GITS_CTLR"])
        except KvmError as e:
            raise ItsStateError(f"the kernel's ITS refused the restore at {step}: {e}") from e

    def stats(self) -> dict[str, int]:
        return {}

    def detach(self) -> None:
        self.routes.close()

    def close(self) -> None:
        self.detach()
