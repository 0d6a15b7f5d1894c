"""A virtio-pci function's queue notifications through KVM_IOEVENTFD, served by the device's
own thread.

A driver notifies queue N by a 2-byte write at its notify address (4.1.4.4, 4.1.5.2). With an
ioeventfd on that address KVM completes the write inside the kernel and signals an eventfd:
the vCPU does not exit to Python's vCPU loop at all (api.rst 4.59 KVM_IOEVENTFD). The device
thread waits on the eventfds of all the function's queues and calls notify_queue for each that
fired (several writes before the thread wakes count as one notification, which is what a
notification means: "look at the queue").

The notify addresses move with BAR 0, which the guest assigns (and may move or disable): the
PCI host calls bar_moved() whenever BAR 0 starts or stops decoding at an address, and the
ioeventfds follow. A write that reaches no ioeventfd (another width, while none is assigned)
still exits as MMIO and VirtioPciFunction.bar_write takes it on the vCPU thread.
"""

from __future__ import annotations

import logging
import selectors
import threading

from kvmits.errors import KvmError
from kvmits.kvm import EventFd

log = logging.getLogger(__name__)


class QueueNotifier:
    """The ioeventfds of `function`'s (a VirtioPciFunction) queues on `vm`, and the thread
    that serves them. start() the thread; close() stops it and removes the ioeventfds."""

    def __init__(self, vm, function, name: str):
        self.vm = vm
        self.function = function
        self.name = name
        self._efds = [EventFd() for _ in range(function.num_queues)]
        self._wake = EventFd()
        self._assigned: list[tuple[EventFd, int, int]] = []     # (efd, address, length)
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake.fileno(), selectors.EVENT_READ, None)
        for index, efd in enumerate(self._efds):
            self._selector.register(efd.fileno(), selectors.EVENT_READ, index)
        self._thread: threading.Thread | None = None
        self._closed = False
        #: held by the thread while it serves a notification, and by pause() until resume()
        self._serving = threading.Lock()
        self.paused = False
        #: notifications taken from the eventfds (each one a notify_queue call)
        self.notifications = 0
        #: ioeventfd (de)assignments KVM refused (the notify writes then exit as MMIO)
        self.refused = 0

    def bar_moved(self, bar: int, address: int | None) -> None:
        """BAR `bar` of the function now decodes at `address` (None: not at all)."""
        if bar != self.function.notify_address(0).bar:
            return
        with self._lock:
            if self._closed:
                return
            self._deassign()
            if address is None:
                return
            for index, efd in enumerate(self._efds):
                where = self.function.notify_address(index)
                gpa = address + where.offset
                try:
                    self.vm.ioeventfd(efd, gpa, where.size, where.datamatch)
                except KvmError as exc:
                    # e.g. EEXIST: a guest put two BARs' notify areas on the same address
                    self.refused += 1
                    log.warning("%s: queue %d's notifications at %#x stay MMIO exits: %s", self.name, index, gpa, exc)
                    continue
                self._assigned.append((efd, gpa, where.size))

    def _deassign(self) -> None:
        for efd, gpa, length in self._assigned:
            try:
                self.vm.ioeventfd_deassign(efd, gpa, length)
            except KvmError as exc:
                self.refused += 1
                log.warning("%s: ioeventfd at %#x not removed: %s", self.name, gpa, exc)
        self._assigned = []

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"kvmits-{self.name}", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        function, efds = self.function, self._efds
        while not self._closed:
            for key, _ in self._selector.select():
                index = key.data
                if index is None:
                    self._wake.read()
                    continue
                if efds[index].read():
                    self.notifications += 1
                    with self._serving:
                        try:
                            function.notify_queue(index)
                        except Exception:  # noqa: BLE001 - a device bug must not end its thread silently
                            log.exception("%s: queue %d's device raised; the queue is left as it is",
                                          self.name, index)

    # -- quiescing, for a save (issue 13) -------------------------------------------------------
    def pause(self, timeout: float = 30.0) -> None:
        """Wait for the notification being served (a request in flight completes: with the
        vCPUs paused no more come) and serve none until resume(); notifications that arrive
        meanwhile wait in their eventfds. TimeoutError if one is still served after `timeout`."""
        if not self._serving.acquire(timeout=timeout):
            raise TimeoutError(f"{self.name}: a queue notification is still being served after {timeout} s")
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._serving.release()

    def kick(self, queues) -> None:
        """Have the thread serve `queues` as if the driver had notified them (after a restore)."""
        for index in queues:
            self._efds[index].write(1)

    def close(self) -> None:
        """Stop the thread (after the notification it may be serving), remove the ioeventfds
        (while the VM exists) and close the eventfds. Once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.vm.fd >= 0:
                self._deassign()
        self._wake.write(1)
        self.resume()
        if self._thread is not None:
            self._thread.join(10)
        self._selector.close()
        for efd in self._efds + [self._wake]:
            efd.close()
