"""The guest-side PCI + virtio-pci driver of the arm64 tests (kvmits.lab.pci_driver), on the
host: its loads and stores go straight to an MmioBus with the PCIe host bridge and a virtio-rng
function on it, so the driver's steps are checked against the device models before the testbed
runs them through a real vCPU."""

from __future__ import annotations

import pytest

from kvmits.lab.guest_driver import DriverError, GuestHeap
from kvmits.lab.pci_driver import GuestPciFunction, GuestVirtio
from kvmits.machine.bus import MmioBus
from kvmits.machine.devices.virtio.pci import (MSIX_BAR, VIRTIO_BAR, VIRTIO_BAR_SIZE, VIRTIO_CONFIG_S_DRIVER_OK,
                                               VirtioPciFunction)
from kvmits.machine.devices.virtio.rng import VirtioRng
from kvmits.machine.memmap import PCIE_ECAM_BASE, PCIE_MMIO_BASE, PCIE_MMIO_SIZE
from kvmits.machine.pci.host import ECAM_BUS_SIZE, PciHost
from tests.machine.pci_fakes import RecordingMsixSink
from tests.machine.virtio_fakes import BASE, DOORBELL, RAM_SIZE, FakeRam


class BusAccess:
    """Loads and stores as a vCPU's would reach the bus."""

    def __init__(self, bus):
        self.bus = bus

    def read(self, addr, width):
        return self.bus.read(0, addr, width)

    def write(self, addr, width, value):
        self.bus.write(0, addr, width, value)


@pytest.fixture
def setup():
    bus, ram, sink = MmioBus(), FakeRam(), RecordingMsixSink()
    host = PciHost(bus, PCIE_MMIO_BASE, PCIE_MMIO_SIZE)
    bus.add(PCIE_ECAM_BASE, ECAM_BUS_SIZE, host)
    dev = VirtioRng(source=lambda n: b"\xab" * n)
    fn = VirtioPciFunction(dev, ram, sink, name="rng")
    dev.function = fn
    host.add(2, fn)
    heap = GuestHeap(ram, BASE + (1 << 20), BASE + RAM_SIZE)
    return GuestPciFunction(BusAccess(bus), PCIE_ECAM_BASE, 2 << 3), ram, heap, sink, fn, host


def bring_up(gfn, ram, heap):
    gfn.place_bar(VIRTIO_BAR, PCIE_MMIO_BASE)
    gfn.place_bar(MSIX_BAR, PCIE_MMIO_BASE + VIRTIO_BAR_SIZE)
    gfn.enable()
    dev = GuestVirtio(gfn, ram, heap)
    dev.initialize()
    for v in range(dev.msix.vectors):
        dev.msix.set_vector(v, DOORBELL, 10 + v)
    dev.msix.control(enable=True)
    dev.setup_queue(0, 8, 0)
    dev.set_config_vector(1)
    dev.driver_ok()
    return dev


def test_enumeration_sizing_and_capabilities(setup):
    gfn, ram, heap, sink, fn, host = setup
    assert gfn.present and not GuestPciFunction(gfn.access, PCIE_ECAM_BASE, 0).present
    assert gfn.ids() == (0x1AF4, 0x1044)
    assert gfn.bar_size(VIRTIO_BAR) == VIRTIO_BAR_SIZE and gfn.bar_size(MSIX_BAR) == 0x1000
    assert [cap_id for _, cap_id in gfn.capabilities()][-1] == 0x11          # MSI-X last


def test_a_request_from_driver_to_used_ring_and_vector(setup):
    gfn, ram, heap, sink, fn, host = setup
    dev = bring_up(gfn, ram, heap)
    assert dev.status & VIRTIO_CONFIG_S_DRIVER_OK
    assert ("route", 0, DOORBELL, 10) in sink.calls
    q = dev.queues[0]
    buf = heap.alloc(32, 16)
    head = q.add([(buf, 32, True)])
    sink.calls.clear()
    dev.notify(0)                                 # an MMIO write here: no ioeventfd on the host
    assert q.take_used() == [(head, 32)]
    assert ram.read(buf, 32) == b"\xab" * 32
    assert sink.calls == [("fire", 0)]
    assert dev.notify_address(0) == PCIE_MMIO_BASE + 0x3000


def test_masking_latches_and_the_pba_shows_it(setup):
    gfn, ram, heap, sink, fn, host = setup
    dev = bring_up(gfn, ram, heap)
    dev.msix.mask(0)
    dev.queues[0].add([(heap.alloc(8, 8), 8, True)])
    sink.calls.clear()
    dev.notify(0)
    assert sink.calls == [] and dev.msix.pending(0)
    dev.msix.mask(0, False)
    assert ("fire", 0) in sink.calls and not dev.msix.pending(0)


def test_a_function_without_virtio_capabilities_is_refused(setup):
    gfn, ram, heap, sink, fn, host = setup
    missing = GuestPciFunction(gfn.access, PCIE_ECAM_BASE, 0)
    missing.read = lambda offset, width=4: 0          # a function with no capability list
    with pytest.raises(DriverError, match="lacks virtio capability"):
        GuestVirtio(missing, ram, heap)
