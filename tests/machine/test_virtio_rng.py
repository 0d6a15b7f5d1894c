"""virtio-rng (virtio 1.2, 5.4) through a real VirtioPciFunction and a driver written here."""

from __future__ import annotations

import itertools
import threading

from kvmits.machine.devices.virtio import pci as V
from kvmits.machine.devices.virtio import rng as R
from kvmits.machine.devices.virtio.pci import VirtioPciFunction
from kvmits.machine.devices.virtio.rng import VirtioRng
from kvmits.machine.devices.virtio.virtqueue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from kvmits.machine.pci import config as P
from tests.machine.pci_fakes import RecordingMsixSink
from tests.machine.virtio_fakes import BASE, RAM_SIZE, Driver, FakeRam


class CountingSource:
    """Deterministic "random" bytes: 0, 1, 2, ... mod 256 across calls; records each n."""

    def __init__(self):
        self.calls: list[int] = []
        self._next = itertools.count()

    def __call__(self, n: int) -> bytes:
        self.calls.append(n)
        return bytes(next(self._next) & 0xFF for _ in range(n))


def expected(start: int, n: int) -> bytes:
    return bytes((start + i) & 0xFF for i in range(n))


def make(source=None, sizes=None):
    ram, sink = FakeRam(), RecordingMsixSink()
    dev = VirtioRng(source or CountingSource())
    fn = VirtioPciFunction(dev, ram, sink, name="rng")
    dev.function = fn
    drv = Driver(fn, ram)
    drv.bring_up(sizes)
    sink.calls.clear()
    return dev, fn, drv, ram, sink


def test_an_entropy_device_on_pci():
    """5.4.1-5.4.4: device ID 4 (PCI 0x1044), one queue, no configuration, only ring features."""
    dev = VirtioRng()
    fn = VirtioPciFunction(dev, FakeRam(), RecordingMsixSink())
    assert fn.config.read(P.PCI_DEVICE_ID, 2) == 0x1044
    assert fn.num_queues == 1 and fn.queues[0].max_size == R.QUEUE_SIZE
    assert V.VIRTIO_PCI_CAP_DEVICE_CFG not in fn.caps
    assert fn.device_features == (1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX
                                  | 1 << V.VIRTIO_F_VERSION_1)


def test_the_writable_buffers_get_the_sources_bytes_and_the_driver_an_interrupt():
    dev, fn, drv, ram, sink = make()
    a, b = drv.alloc(100, fill=0xEE), drv.alloc(50, fill=0xEE)
    head = drv.submit(0, [(a, 100, True), (b, 50, True)])
    drv.kick(0)
    assert drv.reap(0) == [(head, 150)]
    assert ram.get(a, 100) + ram.get(b, 50) == expected(0, 150)
    assert sink.calls == [("fire", 1)]                     # queue 0's vector
    assert (dev.requests, dev.bytes_given) == (1, 150)


def test_a_chain_gets_at_most_64_KiB_written_from_its_start():
    """5.4.6.2: one or more bytes, maybe fewer than the buffers hold: at most
    MAX_BYTES_PER_REQUEST, asked of the source in no larger pieces."""
    src = CountingSource()
    dev, fn, drv, ram, sink = make(src)
    big = drv.alloc(1 << 20, fill=0xEE)
    after = drv.alloc(16, fill=0xEE)
    head = drv.submit(0, [(big, 1 << 20, True), (after, 16, True)])
    drv.kick(0)
    assert drv.reap(0) == [(head, R.MAX_BYTES_PER_REQUEST)]
    assert ram.get(big, R.MAX_BYTES_PER_REQUEST) == expected(0, R.MAX_BYTES_PER_REQUEST)
    assert ram.get(big + R.MAX_BYTES_PER_REQUEST, 16) == b"\xee" * 16
    assert ram.get(after, 16) == b"\xee" * 16
    assert sum(src.calls) == R.MAX_BYTES_PER_REQUEST


def test_readable_buffers_are_skipped_and_counted():
    """5.4.6.1: the driver MUST NOT place driver-readable buffers; the device leaves them."""
    dev, fn, drv, ram, sink = make()
    r, w = drv.alloc(32, fill=0x55), drv.alloc(8, fill=0xEE)
    head = drv.submit(0, [(r, 32, False), (w, 8, True)])
    only_readable = drv.submit(0, [(drv.alloc(8, fill=0x55), 8, False)])
    drv.kick(0)
    assert drv.reap(0) == [(head, 8), (only_readable, 0)]
    assert ram.get(r, 32) == b"\x55" * 32 and ram.get(w, 8) == expected(0, 8)
    assert dev.ignored_readable == 2 and dev.requests == 2


def test_a_buffer_outside_ram_ends_its_chain_without_an_exception():
    dev, fn, drv, ram, sink = make()
    a = drv.alloc(10)
    head = drv.submit(0, [(a, 10, True), (BASE + RAM_SIZE - 4, 8, True), (drv.alloc(4), 4, True)])
    nxt = drv.submit(0, [(drv.alloc(4), 4, True)])
    drv.kick(0)
    assert drv.reap(0) == [(head, 10), (nxt, 4)]
    assert dev.bad_buffers == 1 and dev.bytes_given == 14
    assert not fn.status & V.VIRTIO_CONFIG_S_NEEDS_RESET


def test_a_broken_queue_sets_needs_reset():
    dev, fn, drv, ram, sink = make()
    ring = drv.rings[0]
    ram.poke(ring.avail + 4, "H", 1000)                     # a head past the queue size
    ram.poke(ring.avail + 2, "H", 1)
    drv.kick(0)
    assert fn.status & V.VIRTIO_CONFIG_S_NEEDS_RESET
    assert fn.needs_reset == {"HEAD_OUT_OF_RANGE": 1}
    assert sink.calls == [("fire", 0)]                      # the configuration vector (2.1.2)


def test_buffers_made_available_during_a_notify_are_served_by_it():
    """One notify serves more chains than the queue holds, in bounded rounds, as long as the
    driver keeps adding them (here from inside the source, while the device works)."""
    state = {"drv": None, "added": 0}

    def source(n):
        drv = state["drv"]
        drv.reap(0)
        if state["added"] < 12 and drv.can_submit(0):
            drv.submit(0, [(drv.alloc(4), 4, True)])
            state["added"] += 1
        return b"\x01" * n

    dev, fn, drv, ram, sink = make(source, sizes={0: 4})
    state["drv"] = drv
    for _ in range(4):
        drv.submit(0, [(drv.alloc(4), 4, True)])
    drv.kick(0)
    drv.reap(0)
    assert state["added"] == 12 and dev.requests == 16
    assert drv.rings[0].last_used == 16 and len(drv.rings[0].free) == 4


def test_buffers_published_as_notifications_come_back_on_are_served():
    """enable_notifications() at the end of a round sees a chain published just before it
    (the driver saw notifications off and did not notify): the device serves it at once."""
    dev, fn, drv, ram, sink = make()
    ring = drv.rings[0]
    avail_event = ring.used + 4 + 8 * ring.size
    late = []

    def on_write(gpa, n):
        if gpa == avail_event and len(late) < 3:       # notifications coming back on (2.7.10)
            late.append(drv.submit(0, [(drv.alloc(4), 4, True)]))
    ram.on_write = on_write
    first = drv.submit(0, [(drv.alloc(4), 4, True)])
    drv.kick(0)
    assert [h for h, _ in drv.reap(0)] == [first] + late and len(late) == 3


def test_reset_waits_for_a_notify_in_flight_which_then_returns_nothing():
    """The threading contract: reset from a vCPU while the device thread is inside notify
    waits for it, and the chain it was on is not pushed into the dropped ring."""
    entered, go = threading.Event(), threading.Event()

    def source(n):
        entered.set()
        assert go.wait(10)
        return b"\x02" * n

    dev, fn, drv, ram, sink = make(source)
    drv.submit(0, [(drv.alloc(8), 8, True)])
    used_idx_at = drv.rings[0].used + 2
    notifier = threading.Thread(target=drv.kick, args=(0,))
    notifier.start()
    assert entered.wait(10)
    resetter = threading.Thread(target=drv.reset)
    resetter.start()
    resetter.join(0.2)
    alive = resetter.is_alive()                            # blocked on the device's lock
    go.set()
    notifier.join(10)
    resetter.join(10)
    assert alive and not notifier.is_alive() and not resetter.is_alive()
    assert ram.peek(used_idx_at, "H") == (0,)              # nothing pushed after the reset
    assert fn.queue(0) is None and fn.status == 0
