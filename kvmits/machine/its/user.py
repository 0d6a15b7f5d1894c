"""The userspace ITS in a running VM: the guest's GITS_* frame served on KVM_EXIT_MMIO by the
Python model (kvmits.its.ItsModel), LPIs delivered through the hidden in-kernel ITS
(kvmits.machine.its.hidden), and irqfd MSI routes compiled from the model's translation.

What goes through Python and what does not:
- every guest access to the 128 KiB ITS frame exits to Python (no memory slot covers it);
- a guest write that can run commands (GITS_CWRITER, GITS_CTLR) stops every vCPU, lets the
  model process the queue, runs what that changed on the hidden ITS with one GITS_CWRITER
  attribute write, recompiles the MSI routes if the translation changed, and resumes: one stop
  per guest CWRITER write, however many commands it published;
- an MSI by `signal_msi` (or a guest write to GITS_TRANSLATER) is translated in Python and
  injected with KVM_SIGNAL_MSI on the hidden ITS: no stop;
- an irqfd whose (DeviceID, EventID) translates is routed by KVM straight to the hidden ITS's
  event for that LPI: Python never wakes. One that does not translate is read by a Python thread,
  which hands it to the model (the MSI is dropped and counted, as the architecture says; if the
  translation appeared in the meantime it is delivered).
"""

from __future__ import annotations

import logging
import selectors
import threading
from typing import Callable, Mapping

from kvmits.gic.regs import GICR_PROPBASER, GITS_CREADR, GITS_CTLR, GITS_CWRITER
from kvmits.kvm import EventFd, MsiRoute
from kvmits.machine.its.hidden import INJECTOR_DEVID, LPI_BASE, HiddenIts

log = logging.getLogger(__name__)

#: GICR_PROPBASER.IDbits is capped at 16 by KVM for LPIs behind an ITS (INTERRUPT_ID_BITS_ITS)
KVM_LPI_ID_BITS = 16
_RUNS_COMMANDS = frozenset((GITS_CTLR, GITS_CWRITER, GITS_CWRITER + 4))
#: reads that run the commands a bounded command budget left in the queue (the model processes
#: them for a guest polling for completion: docs/its-model.md, "Command queue")
_POLLS = frozenset((GITS_CTLR, GITS_CREADR, GITS_CREADR + 4))
_TRANSLATION_FRAME = 0x10000


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


class UserItsFrame:
    """The MMIO device the guest sees as its ITS. `pause`: a context manager factory that
    holds every vCPU outside KVM_RUN (kvmits.machine.Machine.paused)."""

    def __init__(self, model, engine: HiddenIts, pause: Callable, lpi_limit: LpiLimit,
                 translater_devid: int = 0, on_translation_change: Callable[[], None] | None = None):
        self.model = model
        self.engine = engine
        self.pause = pause
        self.lpi_limit = lpi_limit
        self.translater_devid = translater_devid
        self.on_translation_change = on_translation_change
        #: the model is one state machine fed by every vCPU thread, the host and the irqfd slow
        #: path: one lock serialises them (a holder may pause the vCPUs: the others are outside
        #: KVM_RUN while they wait for it, so the pause cannot wait on them)
        self.lock = threading.RLock()
        self.stops = 0

    def mmio_read(self, vcpu: int, offset: int, size: int) -> int:
        with self.lock:
            model = self.model
            if offset in _POLLS and model.pending_commands and model.enabled and not model.stalled:
                # This read makes the model run what its command budget left in the queue: the
                # sink calls that causes must be mirrored on the hidden ITS, with the vCPUs
                # stopped, exactly as for a GITS_CWRITER write (else they wait, unflushed, for
                # the next one, and the LPIs they map are not delivered meanwhile).
                value = []
                self.run_commands(lambda: value.append(model.mmio_read(offset, size)))
                return value[0]
            return model.mmio_read(offset, size)

    def mmio_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= _TRANSLATION_FRAME:
                # GITS_TRANSLATER from a CPU: translate in Python, inject without stopping anyone
                self.model.mmio_write(offset, size, value, self.translater_devid)
                return
            if offset in _RUNS_COMMANDS:
                self.run_commands(lambda: self.model.mmio_write(offset, size, value))
                return
            generation = self.model.generation
            self.model.mmio_write(offset, size, value)
            if self.engine.dirty or self.model.generation != generation:
                # The write unmapped something (GITS_BASER<n>.Valid = 0 forgets devices or
                # collections): mirror that on the hidden ITS and recompile the routes. The
                # write itself is done: it must not be done twice.
                self.run_commands(lambda: None, generation)

    def signal_msi(self, devid: int, eventid: int) -> bool:
        """Translate in Python and inject through the hidden ITS (no vCPU stop)."""
        with self.lock:
            return self.model.signal_msi(devid, eventid)

    def translate(self, devid: int, eventid: int):
        with self.lock:
            return self.model.translate(devid, eventid)

    def run_commands(self, action: Callable[[], object], generation: int | None = None) -> None:
        """Stop the vCPUs, run `action` (which may make the model process commands), mirror the
        result on the hidden ITS, resume. `generation`: the model's generation to compare with
        (default: before `action`), to tell whether the MSI routes need recompiling."""
        with self.lock, self.pause():
            if generation is None:
                generation = self.model.generation
            self.stops += 1
            self.lpi_limit.refresh()
            with self.engine.batch():
                action()
            self.engine.flush()
            if self.model.generation != generation and self.on_translation_change is not None:
                self.on_translation_change()


class UserMsiRoutes:
    """(DeviceID, EventID) -> GSI irqfd routes for a userspace ITS, compiled from the model's
    translation to the hidden ITS's injector events. Call `compile()` whenever the translation
    changed (UserItsFrame does, after every command batch)."""

    def __init__(self, vm, frame: UserItsFrame):
        self.vm = vm
        self.frame = frame
        self.engine = frame.engine
        self._table: dict[tuple[int, int], int] = {}
        self._efds: dict[tuple[int, int], EventFd] = {}
        self._in_kernel: set[tuple[int, int]] = set()     # irqfds assigned to KVM now
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake = EventFd()
        self._selector.register(self._wake.fileno(), selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.slow_path_msis = 0
        self.compiles = 0

    def set(self, table: Mapping[tuple[int, int], int]) -> dict[tuple[int, int], EventFd]:
        table = dict(table)
        gsis = list(table.values())
        if len(set(gsis)) != len(gsis):
            raise ValueError("one GSI per (DeviceID, EventID)")
        with self._lock:
            for key in [k for k in self._efds if k not in table]:
                self._unassign(key)
                self._efds.pop(key).close()
            for key in table:
                if key not in self._efds:
                    self._efds[key] = EventFd()
                elif self._table.get(key) != table[key]:
                    self._unassign(key)
            self._table = table
        self.compile()
        return dict(self._efds)

    def compile(self) -> None:
        """Route every translating entry to the hidden ITS; serve the others from Python."""
        with self._lock:
            if self._closed:
                return
            routes, direct = [], set()
            for key, gsi in self._table.items():
                t = self.frame.translate(*key)
                if t.ok:
                    routes.append(MsiRoute(gsi, self.engine.doorbell, t.intid - LPI_BASE, INJECTOR_DEVID))
                    direct.add(key)
            self.vm.set_gsi_routing(routes)
            for key in list(self._in_kernel - direct):
                self._unassign(key)
            for key in direct - self._in_kernel:
                efd = self._efds[key]
                self._unwatch(key)
                self.vm.irqfd(efd, self._table[key])
                self._in_kernel.add(key)
            for key in self._table:
                if key not in direct:
                    self._watch(key)
            self.compiles += 1
        self._ensure_thread()
        self._wake.write(1)

    def _unassign(self, key) -> None:
        if key in self._in_kernel:
            self.vm.irqfd_deassign(self._efds[key], self._table[key])
            self._in_kernel.discard(key)
        self._unwatch(key)

    def _watch(self, key) -> None:
        try:
            self._selector.register(self._efds[key].fileno(), selectors.EVENT_READ, key)
        except KeyError:
            pass                                   # already watched

    def _unwatch(self, key) -> None:
        try:
            self._selector.unregister(self._efds[key].fileno())
        except (KeyError, ValueError):
            pass

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="kvmits-msi-slow-path", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            for sel_key, _ in self._selector.select(timeout=1.0):
                key = sel_key.data
                if key is None:
                    self._wake.read()
                    continue
                with self._lock:
                    efd = self._efds.get(key)
                    count = efd.read() if efd is not None and key not in self._in_kernel else 0
                for _ in range(count):
                    self.slow_path_msis += 1
                    self.frame.signal_msi(*key)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for key in list(self._efds):
                self._unassign(key)
                self._efds.pop(key).close()
        self._wake.write(1)
        if self._thread is not None:
            self._thread.join(5)
        self._selector.close()
        self._wake.close()


#: where the hidden in-kernel ITS lives: in the guest-physical hole between the agent mailbox
#: and RAM, described to the guest by nothing (not in the device tree)
HIDDEN_ITS_BASE = 0x0B00_0000
#: the hidden ITS's tables and command queue: a read-only slot for the guest
PRIVATE_BASE = 0x0C00_0000


class UserIts:
    """What `its="user"` adds to a machine: the model as the guest's ITS, the hidden ITS behind
    it, the memory slots that keep the guest away from the hidden one, and MSI routes.

    Two steps, because of the order KVM accepts: `create()` before the vGIC's CTRL_INIT (an ITS
    must be initialised before the vGIC), `attach()` after it."""

    def __init__(self, config=None, translater_devid: int = 0):
        self.config = config
        self.translater_devid = translater_devid
        self.kernel_its = None
        self.engine: HiddenIts | None = None
        self.model = None
        self.frame: UserItsFrame | None = None
        self.routes: UserMsiRoutes | None = None
        self._memory = []

    def create(self, vm) -> None:
        from kvmits.gic import KernelIts

        self.kernel_its = KernelIts(vm)
        self.kernel_its.set_base(HIDDEN_ITS_BASE)
        self.kernel_its.ctrl_init()

    def attach(self, machine) -> None:
        from kvmits.its import ItsModel, Redistributors
        from kvmits.kvm import GuestMemory
        from kvmits.machine.its.hidden import PRIVATE_SIZE

        vm = machine.vm
        # The hidden ITS's frame is live for the guest unless a memory slot covers it (a guest
        # write of GITS_CTLR = 0 there disabled it on the testbed): a small read-write slot does;
        # KVM_SIGNAL_MSI and irqfds still reach the ITS through the kernel's I/O bus.
        cover = GuestMemory(HIDDEN_ITS_BASE, self.kernel_its.size)
        private = GuestMemory(PRIVATE_BASE, PRIVATE_SIZE)
        self._memory = [cover, private]
        self.cover, self.private = cover, private
        vm.add_memory(cover)
        # Read-only for the guest: its stores exit to the VMM and are dropped; KVM reads the
        # queue and tables as usual (it never needs to write them: we never save this ITS).
        vm.add_memory(private, readonly=True)
        self.engine = HiddenIts(vm, self.kernel_its, private, machine.memmap.cpus)
        self.engine.program()
        self.lpi_limit = LpiLimit(machine.gic, machine.mpidrs[0])
        self.model = ItsModel(machine.ram, self.engine, Redistributors(machine.memmap.cpus, self.lpi_limit),
                              self.config)
        self.frame = UserItsFrame(self.model, self.engine, machine.paused, self.lpi_limit,
                                  self.translater_devid, on_translation_change=self._translation_changed)
        self.routes = UserMsiRoutes(vm, self.frame)
        machine.add_device(machine.memmap.its.base, machine.memmap.its.size, self.frame, "its (userspace)")

    def _translation_changed(self) -> None:
        if self.routes is not None:
            self.routes.compile()

    def signal_msi(self, devid: int, eventid: int) -> int:
        return 1 if self.frame.signal_msi(devid, eventid) else 0

    def reset(self, pause) -> None:
        """The ITS's reset, both halves (KVM_DEV_ARM_ITS_CTRL_RESET's equivalent for the model)."""
        with self.frame.lock, pause():
            self.model.reset()
            self.engine.reset()
        self.routes.compile()

    def detach(self) -> None:
        """Before the VM closes: irqfds and the slow-path thread."""
        if self.routes is not None:
            self.routes.close()
            self.routes = None

    def close(self) -> None:
        """After the VM closed: the memory behind its slots."""
        self.detach()
        for mem in self._memory:
            mem.close()
        self._memory = []
