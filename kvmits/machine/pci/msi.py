"""MSI-X vectors of PCI functions as KVM irqfds on MSI routes through the machine's ITS.

A PCI function's MSI-X message is a write of Message Data to Message Address. On arm64 with an
ITS the address is the ITS's GITS_TRANSLATER and the data the EventID; the DeviceID is not in
the message but is the requester ID the bridge's `msi-map` names (the device tree: RID =
DeviceID on bus 0). KVM takes that DeviceID from the route's devid with KVM_MSI_VALID_DEVID
(api.rst, 4.52 KVM_SET_GSI_ROUTING; an in-kernel ITS drops an MSI without it). So each vector
the guest unmasks becomes a (DeviceID, EventID) entry of the machine's routing table, with one
GSI and one irqfd; the device thread fires the vector by writing that irqfd's eventfd, and KVM
translates it through the ITS (the kernel's, or for the userspace ITS the hidden one on the
route compiled from the model's translation: no Python per interrupt either way).

The machine has one routing table (KVM_SET_GSI_ROUTING replaces it whole): `MsiRouter` owns it,
merging the routes users ask for (Machine.set_msi_routes) with the devices' vectors. Device
vectors take GSIs from the top of the range down, user routes name their own; a user GSI that a
device vector holds is refused. Two vectors (or a vector and a user route) with the same
(DeviceID, EventID) share its GSI: they are the same MSI.

A guest is hostile: a message address other than the ITS doorbell (which on hardware would be
a DMA write to wherever it points) is not routed; firing such a vector is dropped and counted
(`bad_address`), logged once per function.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from kvmits.errors import KvmError
from kvmits.machine.its.routes import MAX_GSI

log = logging.getLogger(__name__)


class MsiRouter:
    """The routing table of one machine's ITS (`its`: a kvmits.machine.its.MachineIts);
    device vectors take their GSIs from `gsis`, highest first."""

    def __init__(self, its, gsis: range = range(MAX_GSI)):
        self.its = its
        self._lock = threading.Lock()
        self._user: dict[tuple[int, int], int] = {}
        self._device: dict[tuple[int, int], tuple[int, int]] = {}     # key -> (gsi, users)
        self._free = list(gsis)                                          # popped from the top
        self._efds: dict = {}                                           # key -> EventFd
        #: (kvmits.machine.trace; empty unless someone traces) called with the whole table after
        #: each time it is set, and with (device, vector, (DeviceID, EventID) or None, sent)
        #: after each vector a device fires
        self.route_observers: list[Callable[[dict], None]] = []
        self.fire_observers: list[Callable[[str, int, tuple | None, bool], None]] = []

    # -- users' routes (Machine.set_msi_routes) -------------------------------------------------
    def set_user(self, table: Mapping[tuple[int, int], int]) -> dict:
        """Replace the user routes; returns (DeviceID, EventID) -> EventFd for them."""
        table = dict(table)
        with self._lock:
            taken = {gsi for key, (gsi, _) in self._device.items() if key not in table}
            clash = sorted(set(table.values()) & taken)
            if clash:
                raise ValueError(f"GSI {clash[0]} is in use by a PCI device's MSI-X vector")
            old = self._user
            self._user = table
            try:
                self._apply()
            except BaseException:
                self._user = old
                raise
            return {key: self._efds[key] for key in table}

    # -- device vectors -------------------------------------------------------------------------
    def sink(self, devid: int, name: str) -> PciMsiSink:
        """The MSI-X sink (kvmits.machine.pci.msix.MsixSink) of the function whose requester
        ID is `devid`."""
        return PciMsiSink(self, devid, name)

    def _acquire(self, key: tuple[int, int]) -> None:
        """A vector now sends `key`: give it a GSI (shared with whoever sends it already)."""
        if key in self._device:
            gsi, users = self._device[key]
            self._device[key] = (gsi, users + 1)
            return
        used = set(self._user.values())
        while self._free and self._free[-1] in used:
            self._free.pop()
        if not self._free:
            raise OverflowError("no GSI left for an MSI-X vector")
        self._device[key] = (self._free.pop(), 1)

    def _release(self, key: tuple[int, int]) -> None:
        gsi, users = self._device[key]
        if users > 1:
            self._device[key] = (gsi, users - 1)
        else:
            del self._device[key]
            self._free.append(gsi)

    def _apply(self) -> None:
        table = {key: gsi for key, (gsi, _) in self._device.items()}
        table.update(self._user)                  # a user route for the same MSI keeps its GSI
        self._efds = self.its.set_msi_routes(table)
        for fn in self.route_observers:
            fn(table)

    def _route(self, old: tuple[int, int] | None, new: tuple[int, int] | None) -> None:
        """A vector's message went from `old` to `new` (None: not routed). If the new table
        cannot be had (no GSI left, KVM refused it) the vector ends up unrouted and the error
        is raised."""
        with self._lock:
            if old == new:
                return
            if old is not None:
                self._release(old)
            try:
                if new is not None:
                    self._acquire(new)
                self._apply()
            except BaseException:
                if new is not None and new in self._device:
                    self._release(new)
                self._apply()
                raise

    def _fire(self, key: tuple[int, int]) -> bool:
        # under the lock: an EventFd a concurrent _apply closes is never written (its number
        # could already name another file)
        with self._lock:
            efd = self._efds.get(key)
            if efd is None:
                return False
            efd.write(1)
            return True

    def table(self) -> dict[tuple[int, int], int]:
        """(DeviceID, EventID) -> GSI of every route, devices' and users'."""
        with self._lock:
            out = {key: gsi for key, (gsi, _) in self._device.items()}
            out.update(self._user)
            return out


class PciMsiSink:
    """One function's MSI-X vectors on the router: an MsixSink. `route()` comes from vCPU
    threads (table writes, unmasks), `fire()` from the device's thread.

    Counters: `fired` (eventfd writes), `bad_address` (fires of a vector whose message does
    not go to the ITS doorbell), `unrouted` (fires of a vector never routed: a device model
    bug, since Msix routes before it fires)."""

    def __init__(self, router: MsiRouter, devid: int, name: str):
        self.router = router
        self.devid = devid
        self.name = name
        self.doorbell = router.its.doorbell
        self._keys: dict[int, tuple[int, int] | None] = {}            # vector -> key, None: none
        self._bad: set[int] = set()                                     # vectors sent elsewhere
        self._warned = False
        self.fired = 0
        self.bad_address = 0
        self.unrouted = 0

    def route(self, vector: int, address: int, data: int) -> None:
        key = (self.devid, data) if address == self.doorbell else None
        old = self._keys.get(vector)
        if key is None and not self._warned:
            self._warned = True
            log.warning("%s: MSI-X vector %d's message goes to %#x, not the ITS doorbell %#x: not "
                        "routed, its interrupts are dropped (logged once)", self.name, vector, address, self.doorbell)
        try:
            self.router._route(old, key)
        except (OverflowError, ValueError, KvmError) as exc:
            # no GSI left, or KVM refused the table: the vector
            # stays unrouted and its interrupts are dropped and counted
            log.warning("%s: MSI-X vector %d not routed: %s", self.name, vector, exc)
            key = None
        self._keys[vector] = key
        if address == self.doorbell:
            self._bad.discard(vector)
        else:
            self._bad.add(vector)

    def fire(self, vector: int) -> None:
        key = self._keys.get(vector)
        sent = False
        if key is None:
            if vector in self._bad:
                self.bad_address += 1
            else:
                self.unrouted += 1
        elif self.router._fire(key):
            self.fired += 1
            sent = True
        else:
            self.unrouted += 1
        observers = self.router.fire_observers
        if observers:
            for fn in observers:
                fn(self.name, vector, key, sent)
