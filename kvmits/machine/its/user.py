"""kvmits' userspace ITS as a machine's ITS: the guest's GITS_* frame served on KVM_EXIT_MMIO by
the Python model (kvmits.its.ItsModel), LPIs delivered through the hidden in-kernel ITS
(kvmits.machine.its.hidden), and irqfd MSI routes compiled from the model's translation
(kvmits.machine.its.routes).

What goes through Python and what does not:
- every guest access to the 128 KiB ITS frame exits to Python (no memory slot covers it);
- a guest write that can run commands (GITS_CWRITER, GITS_CTLR) takes the command path,
  UserMachineIts.run_commands: stop every vCPU, let the model process the queue, run what that
  changed on the hidden ITS with one GITS_CWRITER attribute write, recompile the MSI routes if
  the translation changed, resume. One stop per guest CWRITER write, however many commands it
  published;
- an MSI by `signal_msi` (or a guest write to GITS_TRANSLATER) is translated in Python and
  injected with KVM_SIGNAL_MSI on the hidden ITS: no stop;
- an irqfd whose (DeviceID, EventID) translates is routed by KVM straight to the hidden ITS's
  event for that LPI: Python never wakes. One that does not translate is read by a Python thread,
  which hands it to the model (the MSI is dropped and counted, as the architecture says; if the
  translation appeared in the meantime it is delivered).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from contextlib import AbstractContextManager
from typing import Callable, Mapping

from kvmits.gic import KernelIts
from kvmits.gic.regs import GICR_PROPBASER
from kvmits.its import abi
from kvmits.its.commands import CommandRecord, decode_command
from kvmits.its.model import ItsModel, Translation
from kvmits.its.interfaces import Redistributors
from kvmits.its.query import ItsSnapshot, model_snapshot
from kvmits.its.registers import (
    GITS_BASER, GITS_BASER_COUNT, GITS_CREADR, GITS_CREADR_STALLED, GITS_CTLR, GITS_CTLR_ENABLED, GITS_CWRITER,
    GITS_IIDR, ITS_TRANSLATION_FRAME,
)
from kvmits.kvm import GuestMemory
from kvmits.machine.its.hidden import HiddenIts
from kvmits.machine.its.interface import SAVED_REGISTERS, ItsStateError, MachineIts, parse_its_state
from kvmits.machine.its.routes import UserMsiRoutes

log = logging.getLogger(__name__)

#: how many of the guest's last commands UserMachineIts.command_log keeps
COMMAND_LOG_SIZE = 4096
#: GICR_PROPBASER.IDbits is capped at 16 by KVM for LPIs behind an ITS (INTERRUPT_ID_BITS_ITS)
KVM_LPI_ID_BITS = 16
#: guest writes that can run commands (IHI 0069 5.2: GITS_CWRITER publishes them; GITS_CTLR.Enabled
#: = 1 starts processing what is already queued)
_RUNS_COMMANDS = frozenset((GITS_CTLR, GITS_CWRITER, GITS_CWRITER + 4))
#: reads that run the commands a bounded command budget left in the queue (the model processes
#: them for a guest polling for completion: docs/its-model.md, "Command queue")
_POLLS = frozenset((GITS_CTLR, GITS_CREADR, GITS_CREADR + 4))


class LpiLimit:
    """The exclusive bound of valid LPI INTIDs from the VM's GICR_PROPBASER.IDbits, read through
    the vGIC's KVM_DEV_ARM_VGIC_GRP_REDIST_REGS (so only while the vCPUs are paused) and cached.

    KVM keeps one GICR_PROPBASER for the whole VM (Linux 6.1: kvm->arch.vgic.propbaser) and
    checks MAPTI's pINTID against it; the model must check the same bound."""

    def __init__(self, vgic, mpidr: int):
        self.vgic = vgic
        self.mpidr = mpidr
        self.value = 1 << 1           # GICR_PROPBASER = 0: IDbits 0, no LPI is valid

    def refresh(self) -> int:
        propbaser = self.vgic.get_redist_reg64(self.mpidr, GICR_PROPBASER)
        id_bits = min((propbaser & 0x1F) + 1, KVM_LPI_ID_BITS)
        self.value = 1 << id_bits
        return self.value

    def __call__(self) -> int:
        return self.value


class UserMachineIts(MachineIts):
    """The model as the guest's ITS, and the MMIO device (kvmits.machine.bus.MmioDevice) that
    serves its frame at `base`. Built by attach() in a machine; from parts in the host tests.

    `pause`: a context-manager factory holding every vCPU outside KVM_RUN (Machine.paused);
    `routes`: the irqfd routes compiled from the translation (attach() makes them); `memory`:
    what close() releases after the VM closed."""

    kind = "user"
    live_translation = True

    def __init__(self, model: ItsModel, hidden: HiddenIts, pause: Callable[[], AbstractContextManager],
                 lpi_limit: LpiLimit, *, base: int, ram, nr_vcpus: int, routes=None,
                 translater_devid: int = 0, memory: tuple = ()):
        self.model = model
        self.hidden = hidden
        self.pause = pause
        self.lpi_limit = lpi_limit
        self.base = base
        self.ram = ram
        self.nr_vcpus = nr_vcpus
        self.routes = routes
        #: the DeviceID a CPU's write to GITS_TRANSLATER carries (a CPU is no device)
        self.translater_devid = translater_devid
        self._memory = list(memory)
        #: the model is one state machine fed by every vCPU thread, the host and the irqfd slow
        #: path: one lock serialises them (a holder may pause the vCPUs: the others are outside
        #: KVM_RUN while they wait for it, so the pause cannot wait on them)
        self.lock = threading.RLock()
        #: vCPU stops: one per command batch
        self.stops = 0
        #: the guest's last COMMAND_LOG_SIZE commands (kvmits.its.commands.CommandRecord), oldest
        #: first; each is also logged at DEBUG level ("kvmits.machine.its.user")
        self.command_log: collections.deque[CommandRecord] = collections.deque(maxlen=COMMAND_LOG_SIZE)
        model.command_observers.append(self._log_command)
        #: called after each vCPU stop with (wait, held, commands, vcpus): seconds until every vCPU
        #: was out of KVM_RUN, seconds they stood still, commands the batch ran, vCPUs stopped
        #: (kvmits.machine.trace); empty unless someone traces
        self.stop_observers: list[Callable[[float, float, int, int], None]] = []

    @property
    def frame_device(self) -> UserMachineIts:
        return self

    @staticmethod
    def create(vm, memmap) -> KernelIts:
        """The hidden in-kernel ITS, initialised (attach() does the rest)."""
        return KernelIts.initialised(vm, memmap.hidden_its.base)

    @classmethod
    def attach(cls, vm, device: KernelIts, *, memmap, ram, vgic, mpidr: int, nr_vcpus: int,
               pause: Callable[[], AbstractContextManager], config=None,
               translater_devid: int = 0) -> UserMachineIts:
        """Everything but the hidden ITS itself: the memory slots that keep the guest away from
        it, its programming, the model, the routes."""
        # The hidden ITS's frame is live for the guest unless a memory slot covers it (a guest
        # write of GITS_CTLR = 0 there disabled it on the testbed): a small read-write slot does;
        # KVM_SIGNAL_MSI and irqfds still reach the ITS through the kernel's I/O bus.
        cover = GuestMemory(memmap.hidden_its.base, memmap.hidden_its.size)
        private = GuestMemory(memmap.hidden_its_private.base, memmap.hidden_its_private.size)
        try:
            vm.add_memory(cover)
            # Read-only for the guest: its stores exit to the VMM and are dropped; KVM reads the
            # queue and tables as usual (it never needs to write them: we never save this ITS).
            vm.add_memory(private, readonly=True)
            hidden = HiddenIts(vm, device, private, nr_vcpus)
            hidden.program()
        except BaseException:
            cover.close()
            private.close()
            raise
        lpi_limit = LpiLimit(vgic, mpidr)
        model = ItsModel(ram, hidden, Redistributors(nr_vcpus, lpi_limit), config)
        its = cls(model, hidden, pause, lpi_limit, base=memmap.its.base, ram=ram, nr_vcpus=nr_vcpus,
                  translater_devid=translater_devid, memory=(cover, private))
        its.routes = UserMsiRoutes(vm, hidden, its.signal_msi)
        return its

    def _log_command(self, record: CommandRecord) -> None:
        self.command_log.append(record)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("ITS command at %#x: %s%s", record.offset, decode_command(*record.dwords),
                      f" -> {record.error_name}" if record.error else "")

    # -- the guest's frame (MmioDevice; vCPU threads) ------------------------------------------------
    def mmio_read(self, vcpu: int, offset: int, size: int) -> int:
        with self.lock:
            model = self.model
            if offset in _POLLS and model.pending_commands and model.enabled and not model.stalled:
                # This read makes the model run what its command budget left in the queue: the
                # hidden ITS must see that with the vCPUs stopped, as for a GITS_CWRITER write
                # (else it waits, unflushed, for the next one, and the LPIs it maps are not
                # delivered meanwhile).
                return self.run_commands(lambda: model.mmio_read(offset, size))
            return model.mmio_read(offset, size)

    def mmio_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            model = self.model
            if offset >= ITS_TRANSLATION_FRAME:
                # GITS_TRANSLATER from a CPU: translate in Python, inject without stopping anyone
                model.mmio_write(offset, size, value, self.translater_devid)
            elif offset in _RUNS_COMMANDS:
                self.run_commands(lambda: model.mmio_write(offset, size, value))
            else:
                generation = model.generation
                model.mmio_write(offset, size, value)
                if self.hidden.dirty or model.generation != generation:
                    # The write unmapped something (GITS_BASER<n>.Valid = 0 forgets devices or
                    # collections): mirror that on the hidden ITS and recompile the routes. The
                    # write itself is done: it must not be done twice.
                    self.run_commands(lambda: None, generation)

    # -- the command path -----------------------------------------------------------------------------
    def run_commands(self, action: Callable[[], object], generation: int | None = None):
        """The GITS_CWRITER path, top to bottom: stop the vCPUs, run `action` (a guest access that
        makes the model process its queue), apply what the model asked of its LPI sink to the
        hidden ITS, recompile the MSI routes if the translation changed, resume. Returns what
        `action` returned. `generation`: the model's generation to compare with (default: the
        one before `action`)."""
        model, hidden = self.model, self.hidden
        with self.lock:
            observed = self.stop_observers
            if observed:
                t0, done0 = time.perf_counter(), model.commands_processed
            with self.pause():                              # 1. every vCPU outside KVM_RUN
                if observed:
                    t1 = time.perf_counter()
                if generation is None:
                    generation = model.generation
                self.stops += 1
                self.lpi_limit.refresh()                    # the pINTID bound MAPTI checks
                with hidden.batch():                        # 2. the queue runs; the sink calls
                    result = action()                       #    are queued, in command order
                hidden.flush()                              # 3. one GITS_CWRITER on the hidden ITS
                if model.generation != generation and self.routes is not None:
                    self.routes.compile(model.translate)    # 4. irqfds follow the translation
            if observed:                                    # 5. resumed on leaving the pause
                t2 = time.perf_counter()
                for fn in observed:
                    fn(t1 - t0, t2 - t0, model.commands_processed - done0, self.nr_vcpus)
        return result

    # -- MachineIts ----------------------------------------------------------------------------------
    def signal_msi(self, devid: int, eventid: int) -> int:
        # translated in Python, injected through the hidden ITS (every step visible to the
        # model's observers); no vCPU stop
        with self.lock:
            return 1 if self.model.signal_msi(devid, eventid) else 0

    def set_msi_routes(self, table: Mapping[tuple[int, int], int]) -> dict:
        with self.lock:
            return self.routes.set(table, self.model.translate)

    def reset(self) -> None:
        """Both halves: the model's reset (KVM_DEV_ARM_ITS_CTRL_RESET's equivalent) and the
        hidden ITS's, which KVM_DEV_ARM_ITS_CTRL_RESET empties and kvmits programs again."""
        with self.lock, self.pause():
            self.model.reset()
            self.hidden.reset()
            self.routes.compile(self.model.translate)

    def snapshot(self) -> ItsSnapshot:
        # read under the lock, without stopping the guest and without writing guest memory
        with self.lock:
            return model_snapshot(self.model)

    def translate(self, devid: int, eventid: int, snap: ItsSnapshot | None = None) -> Translation:
        with self.lock:                                      # the model's own live answer
            return self.model.translate(devid, eventid)

    def saved_tables(self) -> abi.TablesContent:
        with self.lock:
            model = self.model
            model.save_tables()
            baser0 = model.mmio_read(GITS_BASER(0), 8)
            baser1 = model.mmio_read(GITS_BASER(1), 8)
        return abi.read_tables(self.ram, baser0, baser1, nr_vcpus=self.nr_vcpus)

    def lpi_vcpu(self, intid: int) -> int | None:
        with self.lock:
            return self.hidden.mapping().get(intid)

    def orphaned_ites(self) -> tuple[tuple[int, int], ...]:
        with self.lock:
            return self.model.orphaned_ites()

    def save_state(self) -> dict:
        with self.lock:
            model = self.model
            model.save_tables()          # the tables into guest RAM, as KVM's SAVE_TABLES
            return self._state({name: model.mmio_read(offset, 4 if offset in (GITS_CTLR, GITS_IIDR) else 8)
                                for name, offset in SAVED_REGISTERS})

    def restore_state(self, state: dict) -> None:
        """The model from the registers and the tables in guest RAM (what KVM's uaccess and
        RESTORE_TABLES do, in the same order), then the hidden ITS from the model's mappings.
        Only the model's own checks apply: the model was configured as the running kernel's
        ITS (kvmits.machine.its.behaviour), so it refuses what that kernel refuses."""
        regs = parse_its_state(state)
        model, hidden = self.model, self.hidden
        iidr = model.mmio_read(GITS_IIDR, 4)
        if regs["GITS_IIDR"] != iidr:
            # KVM takes the revision (the table ABI); the model has the one ABI, rev 0
            raise ItsStateError(f"ITS state: GITS_IIDR {regs['GITS_IIDR']:#x}, the model's is {iidr:#x}")
        creadr = regs["GITS_CREADR"]
        registers = {"enabled": False, "cbaser": regs["GITS_CBASER"], "cwriter": regs["GITS_CWRITER"] & ~0x1F,
                     "creadr": creadr & ~0x1F, "stalled": bool(creadr & GITS_CREADR_STALLED),
                     "queue_invalid": False,
                     "baser": [regs[f"GITS_BASER{n}"] for n in range(GITS_BASER_COUNT)]}
        with self.lock:
            step = "the registers"
            try:
                model.load_state({"format": "kvmits-its-model", "version": 1, "registers": registers,
                                  "devices": {}, "collections": {}, "placeholders": []}, notify_sink=False)
                self.lpi_limit.refresh()              # the restored GICR_PROPBASER's bound
                with hidden.batch():
                    step = "the tables (the model's restore_tables)"
                    model.restore_tables()            # the sink calls map every ITE on the hidden ITS
                    step = f"GITS_CTLR = {regs['GITS_CTLR']:#x}"
                    # enabling processes what is still queued between CREADR and CWRITER, as KVM's does
                    model.mmio_write(GITS_CTLR, 4, regs["GITS_CTLR"] & GITS_CTLR_ENABLED)
                hidden.flush()
            except (ValueError, abi.ItsTableError) as e:
                raise ItsStateError(f"the userspace ITS refused the restore at {step}: {e}") from e
            if self.routes is not None:
                self.routes.compile(model.translate)

    def stats(self) -> dict[str, int]:
        hidden, routes = self.hidden, self.routes
        out = {"vcpu_stops": self.stops, "hidden_its_kicks": hidden.kicks, "hidden_its_commands": hidden.commands,
               "msis_injected": hidden.injected, "msis_dropped": hidden.dropped}
        if routes is not None:
            out.update(slow_path_msis=routes.slow_path_msis, route_compiles=routes.compiles)
        return out

    def detach(self) -> None:
        if self.routes is not None:
            self.routes.close()

    def close(self) -> None:
        self.detach()
        for mem in self._memory:
            mem.close()
        self._memory = []
