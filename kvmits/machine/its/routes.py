"""irqfd MSI routes: a (DeviceID, EventID) -> GSI table compiled into KVM's GSI routing
(KVM_SET_GSI_ROUTING, KVM_IRQ_ROUTING_MSI with KVM_MSI_VALID_DEVID), one irqfd per GSI.

- MsiRoutes: for the kernel's ITS, each route is the MSI itself, to its GITS_TRANSLATER;
- UserMsiRoutes: for the userspace ITS, each route is compiled from the model's translation to
  the hidden ITS's event for the LPI; an entry that does not translate is served by Python.

On arm64 an MSI is a write of the EventID to GITS_TRANSLATER with the DeviceID on the side;
KVM carries the DeviceID in the route's devid field, which is why KVM_MSI_VALID_DEVID is set on
every route (api.rst, 4.52 KVM_SET_GSI_ROUTING). A write to a route's EventFd makes KVM translate
the MSI through the ITS and raise the LPI, without waking Python. No vCPU pause is needed.
"""

from __future__ import annotations

import selectors
import threading
import time
from collections.abc import Callable, Mapping

from kvmits.its.model import Translation
from kvmits.kvm import EventFd, MsiRoute
from kvmits.kvm.eventfd import ensure_fd_limit
from kvmits.machine.its.hidden import injector_msi

#: KVM_MAX_IRQ_ROUTES (include/linux/kvm_host.h): GSIs are below it
MAX_GSI = 4096


class MsiRoutes:
    """The VM's whole MSI routing table for one ITS doorbell (the guest-physical address of its
    GITS_TRANSLATER), and the EventFds it owns: one per GSI, bound with KVM_IRQFD."""

    def __init__(self, vm, doorbell: int):
        self.vm = vm
        self.doorbell = doorbell
        self._table: dict[tuple[int, int], int] = {}
        self._efds: dict[int, EventFd] = {}          # gsi -> its irqfd

    def set(self, table: Mapping[tuple[int, int], int]) -> dict[tuple[int, int], EventFd]:
        """Replace the routing table with `table`: (DeviceID, EventID) -> GSI. Returns
        (DeviceID, EventID) -> EventFd; write(1) to one to signal that MSI. A GSI kept from the
        previous table keeps its EventFd (now meaning the new entry); dropped GSIs lose theirs."""
        table = dict(table)
        gsis: dict[int, tuple[int, int]] = {}
        for (devid, eventid), gsi in table.items():
            if not (0 <= devid < 1 << 32 and 0 <= eventid < 1 << 32):
                raise ValueError(f"DeviceID/EventID out of range: {(devid, eventid)}")
            if not 0 <= gsi < MAX_GSI:
                raise ValueError(f"GSI {gsi} out of range 0..{MAX_GSI - 1}")
            if gsi in gsis:
                raise ValueError(f"GSI {gsi} given to both {gsis[gsi]} and {(devid, eventid)}")
            gsis[gsi] = (devid, eventid)
        routes = [MsiRoute(gsi, self.doorbell, eventid, devid) for (devid, eventid), gsi in table.items()]
        ensure_fd_limit(len(gsis))                   # an irqfd per GSI: up to 4096 descriptors
        self.vm.set_gsi_routing(routes)              # fails as a whole: nothing changed yet
        for gsi in [g for g in self._efds if g not in gsis]:
            efd = self._efds.pop(gsi)
            self.vm.irqfd_deassign(efd, gsi)
            efd.close()
        for gsi in gsis:
            if gsi not in self._efds:
                efd = EventFd()
                try:
                    self.vm.irqfd(efd, gsi)
                except BaseException:
                    efd.close()
                    raise
                self._efds[gsi] = efd
        self._table = table
        return {key: self._efds[gsi] for key, gsi in table.items()}

    @property
    def table(self) -> dict[tuple[int, int], int]:
        return dict(self._table)

    def eventfd(self, devid: int, eventid: int) -> EventFd:
        """The EventFd that signals MSI (devid, eventid); KeyError if it has no route."""
        return self._efds[self._table[(devid, eventid)]]

    def clear(self) -> None:
        """No routes, no irqfds."""
        self.set({})

    def close(self) -> None:
        """Deassign and close every EventFd (the routing table stays with the VM)."""
        for gsi, efd in list(self._efds.items()):
            if self.vm.fd >= 0:
                self.vm.irqfd_deassign(efd, gsi)
            efd.close()
        self._efds.clear()
        self._table = {}


class UserMsiRoutes:
    """(DeviceID, EventID) -> GSI irqfd routes for the userspace ITS, compiled from the model's
    translation to the hidden ITS's injector events (`hidden`: a kvmits.machine.its.hidden.
    HiddenIts). `deliver(devid, eventid)`: how the slow-path thread hands the model an MSI whose
    entry did not translate when it was compiled.

    The caller holds the userspace ITS's lock around set() and compile() and passes the model's
    translate: the translation cannot change under a compilation."""

    def __init__(self, vm, hidden, deliver: Callable[[int, int], object]):
        self.vm = vm
        self.hidden = hidden
        self.deliver = deliver
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
        #: called after each compile() with (routes in KVM, entries left to Python, seconds)
        #: (kvmits.machine.trace); empty unless someone traces
        self.compile_observers: list[Callable[[int, int, float], None]] = []

    def set(self, table: Mapping[tuple[int, int], int],
            translate: Callable[[int, int], Translation]) -> dict[tuple[int, int], EventFd]:
        """Replace the table (as MsiRoutes.set) and compile it with `translate`."""
        table = dict(table)
        gsis = list(table.values())
        if len(set(gsis)) != len(gsis):
            raise ValueError("one GSI per (DeviceID, EventID)")
        ensure_fd_limit(len(gsis))                   # an irqfd per GSI: up to 4096 descriptors
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
        self.compile(translate)
        return dict(self._efds)

    def compile(self, translate: Callable[[int, int], Translation]) -> None:
        """Route every translating entry to the hidden ITS; serve the others from Python."""
        observed = self.compile_observers
        if observed:
            t0 = time.perf_counter()
        with self._lock:
            if self._closed:
                return
            routes, direct = [], set()
            for key, gsi in self._table.items():
                t = translate(*key)
                if t.ok:
                    devid, event = injector_msi(t.intid)
                    routes.append(MsiRoute(gsi, self.hidden.doorbell, event, devid))
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
        if observed:
            seconds = time.perf_counter() - t0
            for fn in observed:
                fn(len(direct), len(self._table) - len(direct), seconds)

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
                    self.deliver(*key)

    def close(self) -> None:
        """Deassign and close every EventFd and stop the slow-path thread (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for key in list(self._efds):
                self._unassign(key)
                self._efds.pop(key).close()
        self._wake.write(1)
        if self._thread is not None:
            self._thread.join(5)
        self._selector.close()
        self._wake.close()
