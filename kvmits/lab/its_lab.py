"""An arm64 VM ready for ITS work: the guest agent on every vCPU, the LPI tables and an ITS
driver set up through it, and the host-side helpers to inject MSIs and see where they land.

    with ItsLab(cpus=4) as lab:              # its="kernel": the kernel's ITS
        lab.setup()                          # EnableLPIs, ITS tables + queue, MAPC icid n -> vCPU n
        lab.its.mapd(1, event_bits=4)
        lab.its.mapti(1, 0, 8192, icid=2)
        lab.msi(1, 0)                        # KVM_SIGNAL_MSI
        lab.expect(cpu=2, intid=8192)        # the guest took it on vCPU 2

The same steps, through the same guest, work on every ITS kvmits can give a machine: tests,
the differential harness and the benchmarks are written once against this class.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import BinaryIO

from kvmits.its import abi
from kvmits.its import commands as cmd
from kvmits.its.query import ItsSnapshot
from kvmits.lab.guest_driver import GuestGic, GuestHeap, GuestIts
from kvmits.machine import Machine, MachineConfig
from kvmits.machine.agent import Agent, AgentTimeout, IrqMode, guest_program

DEFAULT_MEM = 256 << 20


class ItsLab:
    """One VM running the guest agent, with a guest-side GICv3 LPI + ITS driver."""

    def __init__(self, cpus: int = 4, its: str = "kernel", mem_size: int = DEFAULT_MEM,
                 console: BinaryIO | None = None, timeout: float = 60.0, its_config=None,
                 disks: tuple = (), rng: bool = False, queue_size: int = 0x10000):
        self.cpus = cpus
        self.mode = its
        #: how long one guest access may take (the kernel's ITS runs a whole batch in the
        #: GITS_CWRITER store), and the agent's start-up
        self.timeout = timeout
        self._console = console
        # its_config: with its="user", the model's kvmits.its.ItsConfig (None: like the kernel's);
        # disks, rng: PCI devices (MachineConfig), for a guest driver (kvmits.lab.pci_driver);
        # queue_size: the guest's ITS command queue, 4 KiB to 1 MiB (GITS_CBASER.Size)
        self.machine = Machine(MachineConfig(cpus=cpus, mem_size=mem_size, its=its, agent=True,
                                             its_config=its_config, disks=disks, rng=rng), console=console)
        try:
            self.machine.load(guest_program("agent"))
            self.machine.start()
            self.agent: Agent = self.machine.agent
            self.agent.wait_online([0], timeout)
            if cpus > 1:
                self.agent.start_cpus(cpus, timeout=timeout)
            ram = self.machine.ram
            heap_base = self.machine.boot.end
            self.heap = GuestHeap(ram, heap_base, self.machine.memmap.ram.end)
            access = self.agent.client(0, self.timeout)
            self.gic = GuestGic(access, ram, self.heap, self.machine.memmap.gicr_base, cpus)
            self.its = GuestIts(access, ram, self.heap, self.machine.memmap.its.base, queue_size)
        except BaseException:
            self.machine.close()
            raise

    def migrate(self, its: str | None = None, path=None) -> dict:
        """Move the running guest into a new VM whose ITS is `its` (default: the same kind), by
        kvmits.machine.migration.migrate (with `path`: through a snapshot file there). The
        guest driver's view (heap, tables, queue) carries on against the new VM. Returns the
        migration's report (downtime, ...)."""
        from kvmits.machine.migration import migrate

        new, report = migrate(self.machine, its, path=path, console=self._console)
        self.machine = new
        self.mode = new.config.its
        self.agent = new.agent
        access = self.agent.client(0, self.timeout)
        self.heap.ram = self.gic.ram = self.its.ram = new.ram
        self.gic.access = self.its.access = access
        return report

    def setup(self, lpis_enabled: bool = True, two_level: bool = False) -> None:
        """LPIs on every redistributor (all LPIs enabled, or all disabled), the ITS tables and
        command queue, and one collection per vCPU: ICID n -> vCPU n."""
        self.gic.enable_lpis(enabled=lpis_enabled)
        self._heap_mark = self.heap.next
        self._two_level = two_level
        self._setup_its()

    def _setup_its(self) -> None:
        self.its.setup(two_level=self._two_level)
        # one batch (one GITS_CWRITER write) for all collections: a reset is as cheap as it can be
        self.its.submit(*(cmd.encode_mapc(cpu, cpu) for cpu in range(self.cpus)), cmd.encode_sync(0))

    def reset_its(self) -> None:
        """Reset the ITS (the kernel's: KVM_DEV_ARM_ITS_CTRL_RESET; the userspace one: the model
        and its hidden ITS), free what the guest allocated for it, and set it up again."""
        self.machine.its.reset()
        self.heap.next = self._heap_mark
        self.its.devices.clear()
        self.its.tables.clear()
        self._setup_its()

    def its_state(self) -> dict:
        """The ITS's mapping state as a canonical dump (kvmits.its.abi.canonical_dump), as its
        saved tables hold it (its_tables())."""
        return self.its_tables().dump

    def its_tables(self) -> abi.TablesContent:
        """Save the ITS's tables into guest memory and decode them (ABI rev 0): the kernel's
        ITS with KVM_DEV_ARM_ITS_SAVE_TABLES, the userspace model with its save_tables(). One
        path for both, so what the ABI cannot express (orphaned ITEs) is missing on both."""
        return self.machine.its.saved_tables()

    def snapshot(self) -> ItsSnapshot:
        """The ITS's mappings now (MachineIts.snapshot): a translation query answers from it in
        either mode."""
        return self.machine.its.snapshot()

    def orphaned_ites(self) -> tuple[tuple[int, int], ...] | None:
        """(DeviceID, EventID) of the ITEs whose collection was unmapped (see
        ItsModel.orphaned_ites): the userspace model knows them; None for the kernel's ITS,
        whose saved tables do not show them."""
        return self.machine.its.orphaned_ites()

    # -- interrupts from the host ------------------------------------------------------------
    def msi(self, devid: int, eventid: int) -> int:
        """An MSI from DeviceID `devid` with EventID `eventid`, by KVM_SIGNAL_MSI: 1 if it was
        delivered, 0 if it did not translate."""
        return self.machine.signal_msi(devid, eventid)

    def routes(self, table: dict[tuple[int, int], int]) -> dict:
        """irqfd routes (DeviceID, EventID) -> GSI; returns (DeviceID, EventID) -> EventFd."""
        return self.machine.set_msi_routes(table)

    # -- masked phases: what is pending, and where ---------------------------------------------
    def mask(self) -> None:
        """Every vCPU stops taking interrupts (the agent's IrqMode.MASKED: PSTATE.I set), so
        LPIs made pending stay pending, where the ITS and KVM put them. Earlier reports are
        dropped."""
        for cpu in range(self.cpus):
            self.agent.irq_mode(cpu, IrqMode.MASKED)
        self.agent.take_irqs()

    def unmask(self) -> list[tuple[int, int]]:
        """Every vCPU takes interrupts again; returns the (vCPU, INTID) of each interrupt taken
        then, sorted: what was pending, on the vCPU KVM had it on."""
        for cpu in range(self.cpus):
            self.agent.irq_mode(cpu, IrqMode.REPORT)
        # A vCPU takes what is pending on it as soon as it unmasks; an LPI KVM re-targeted
        # while it sat on another vCPU's list moves at that vCPU's next exit: a round of pings
        # (one exit each), a pause, and another round leave nothing in flight.
        for _ in range(2):
            for cpu in range(self.cpus):
                self.agent.ping(cpu)
            time.sleep(0.05)
        self.agent.check()
        return sorted((cpu, intid) for cpu, intid, _ in self.agent.take_irqs())

    @contextmanager
    def holding(self):
        """For the block, every vCPU but the one the guest driver runs on (vCPU 0) is held out
        of KVM_RUN, so the guest's ITS commands run while no other vCPU executes guest code, as
        the userspace ITS runs them (it pauses every vCPU). Why it matters: KVM folds a running
        vCPU's list registers back into its interrupts at the vCPU's next exit, and an edge
        interrupt keeps the pending bit it had there: a CLEAR of an LPI that sat in a running
        vCPU's list register is lost (docs/userspace-its.md). Mask first, unmask after: both
        need every vCPU."""
        with self.machine.holding(range(1, self.cpus)):
            yield

    # -- what the guest saw ------------------------------------------------------------------
    def expect(self, cpu: int, intid: int, timeout: float = 10.0) -> float:
        """Wait until vCPU `cpu` reports taking `intid`; fails if it arrives elsewhere first.
        Returns the time of the report."""
        try:
            got = self.agent.wait_irqs(1, timeout, intid=intid)
        except AgentTimeout as exc:
            raise AssertionError(f"LPI {intid} did not reach the guest within {timeout} s "
                                 f"(other reports: {self.agent.take_irqs()})") from exc
        cpus = [r[0] for r in got]
        if cpus != [cpu]:
            raise AssertionError(f"LPI {intid} was taken on vCPU(s) {cpus}, expected once on vCPU {cpu}")
        return got[0][2]

    def expect_none(self, window: float = 0.5) -> None:
        """Nothing reaches the guest for `window` seconds."""
        time.sleep(window)
        self.agent.check()
        irqs = self.agent.take_irqs()
        if irqs:
            raise AssertionError(f"unexpected interrupts reached the guest: {[(c, i) for c, i, _ in irqs]}")

    def close(self) -> None:
        self.machine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
