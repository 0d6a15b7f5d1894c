"""Queue notifications on KVM_IOEVENTFD, served by the device's thread
(kvmits.machine.devices.virtio.ioevents), against the host's real KVM (x86_64): the tiny
real-mode guest's first MMIO write (2 bytes at x86guest.MMIO) is a notify."""

from __future__ import annotations

import threading
import time

import pytest

from kvmits.bench import x86guest
from kvmits.machine.devices.virtio.ioevents import QueueNotifier
from kvmits.machine.devices.virtio.pci import NotifyAddress
from tests.test_kvm_x86 import _run_round_trip as run_round_trip

pytestmark = pytest.mark.kvm
TIMEOUT = 10


class FakeFunction:
    """A virtio-pci function's notify side: queue N notifies at BAR 0 + 4 * N (2 bytes)."""

    num_queues = 2

    def __init__(self):
        self.notified = []
        self.event = threading.Event()

    def notify_address(self, index):
        return NotifyAddress(0, 4 * index, 2, None)

    def notify_queue(self, index):
        self.notified.append(index)
        self.event.set()
        return True


def run_to_hlt(vcpu):
    """The MMIO writes that exited to userspace before the guest's HLT."""
    return [addr for addr, is_write, _ in run_round_trip(vcpu) if is_write]


@pytest.fixture
def guest(x86_kvm):
    """(vCPU running x86guest.ROUND_TRIP, the fake function, its started QueueNotifier)."""
    with x86_kvm.create_vm() as vm:
        vcpu, ram = x86guest.boot(vm, x86guest.ROUND_TRIP)
        function = FakeFunction()
        notifier = QueueNotifier(vm, function, "vtest")
        notifier.start()
        try:
            yield vcpu, function, notifier
        finally:
            notifier.close()
            ram.close()


@pytest.mark.parametrize("base, queues", [(x86guest.MMIO, [0, 1]), (x86guest.MMIO - 4, [1])])
def test_notify_writes_are_taken_by_the_kernel_and_served_by_the_device_thread(guest, base, queues):
    """The guest writes 2 bytes at MMIO, then at MMIO + 4: with BAR 0 at MMIO those are queues
    0 and 1's notify addresses, with BAR 0 at MMIO - 4 queue 1's and nothing's."""
    vcpu, function, notifier = guest
    notifier.bar_moved(0, base)
    exited = run_to_hlt(vcpu)
    for q in queues:
        assert base + 4 * q not in exited                        # no exit for a notify
    deadline = time.monotonic() + TIMEOUT
    while len(function.notified) < len(queues) and time.monotonic() < deadline:
        function.event.wait(0.05)
    assert sorted(function.notified) == queues and notifier.notifications == len(queues)


def test_the_ioeventfds_follow_the_bar_and_go_when_it_stops_decoding(guest):
    vcpu, function, notifier = guest
    notifier.bar_moved(0, x86guest.MMIO)
    notifier.bar_moved(0, 0x20_0000)                             # moved away: the write exits again
    assert x86guest.MMIO in run_to_hlt(vcpu)
    notifier.bar_moved(2, x86guest.MMIO)                         # not the notify BAR: ignored
    notifier.bar_moved(0, None)
    assert notifier.refused == 0 and function.notified == []


def test_an_address_taken_twice_is_refused_and_counted_not_raised(x86_kvm):
    with x86_kvm.create_vm() as vm:
        a, b = FakeFunction(), FakeFunction()
        na, nb = QueueNotifier(vm, a, "a"), QueueNotifier(vm, b, "b")
        try:
            na.bar_moved(0, 0x1_0000)
            nb.bar_moved(0, 0x1_0000)                            # a guest overlapping two BARs
            assert nb.refused == 2 and na.refused == 0
        finally:
            na.close()
            nb.close()
