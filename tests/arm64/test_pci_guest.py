"""PCIe, virtio-pci and MSI-X on arm64 KVM, driven by a guest (the agent, kvmits.lab.pci_driver),
with both ITSes: enumeration through ECAM, BAR sizing and placement, a virtio request notified
through KVM_IOEVENTFD and completed by an MSI-X vector's irqfd through the ITS to an LPI on the
vCPU the ITS names; masking and the PBA; MOVI; the userspace ITS translating nothing in Python;
and what a hostile driver can do (BARs over the GIC, MSI-X messages to nowhere, descriptor loops,
config accesses of every width)."""

from __future__ import annotations

import os

import pytest

from kvmits.its.registers import LPI_BASE
from kvmits.lab.pci_driver import GuestPciFunction, GuestVirtio
from kvmits.machine.devices.virtio.pci import (MSIX_BAR, VIRTIO_BAR, VIRTIO_BAR_SIZE, VIRTIO_CONFIG_S_NEEDS_RESET,
                                               VIRTIO_PCI_MODERN_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID)
from kvmits.machine.devices.virtio.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmits.machine.machine import FIRST_PCI_SLOT, Disk
from kvmits.machine.memmap import GICD_BASE, PCIE_ECAM_BASE, PCIE_MMIO_BASE

CPUS = 4
BLK_SLOT, RNG_SLOT = FIRST_PCI_SLOT, FIRST_PCI_SLOT + 1
BLK_DEVID, RNG_DEVID = BLK_SLOT << 3, RNG_SLOT << 3
VIRTIO_ID_BLOCK, VIRTIO_ID_RNG = 2, 4
# the rng's events: 0 = its queue (vCPU 2), 1 = its configuration changes (vCPU 1)
RNG_QUEUE_LPI, RNG_CONFIG_LPI = LPI_BASE + 100, LPI_BASE + 101
DISK_BYTES = 1 << 20
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = 0, 1


def bar_base(slot: int) -> int:
    return PCIE_MMIO_BASE + slot * 0x10_0000


@pytest.fixture(scope="module", params=["kernel", "user"])
def lab(arm64_kvm, request, tmp_path_factory):
    from kvmits.lab.its_lab import ItsLab

    disk = tmp_path_factory.mktemp("pci") / "disk.img"
    disk.write_bytes(bytes(DISK_BYTES))
    with ItsLab(cpus=CPUS, its=request.param, disks=(Disk(str(disk), queues=2),), rng=True) as lab:
        lab.setup()
        lab.disk = disk
        its = lab.its
        its.mapd(RNG_DEVID, event_bits=1)
        its.mapti(RNG_DEVID, 0, RNG_QUEUE_LPI, icid=2)
        its.mapti(RNG_DEVID, 1, RNG_CONFIG_LPI, icid=1)
        its.mapd(BLK_DEVID, event_bits=2)
        for event in range(3):                       # config, queue 0, queue 1
            its.mapti(BLK_DEVID, event, LPI_BASE + 200 + event, icid=event)
        yield lab


def function(lab, slot: int) -> GuestPciFunction:
    return GuestPciFunction(lab.agent.client(0), PCIE_ECAM_BASE, slot << 3)


def bring_up(lab, slot: int, queue_vectors: dict[int, int], config_vector: int, queue_size: int = 8,
             features: int = 0) -> GuestVirtio:
    """What a driver does: place BARs, enable memory and bus mastering, MSI-X vector v -> event
    v (unmasked), enable MSI-X, initialise the device, its queues and DRIVER_OK."""
    fn = function(lab, slot)
    fn.place_bar(VIRTIO_BAR, bar_base(slot))
    fn.place_bar(MSIX_BAR, bar_base(slot) + VIRTIO_BAR_SIZE)
    fn.enable()
    dev = GuestVirtio(fn, lab.machine.ram, lab.heap)
    dev.initialize(features)
    for v in range(dev.msix.vectors):
        dev.msix.set_vector(v, lab.its.doorbell, v)
    dev.msix.control(enable=True)
    for index, vector in queue_vectors.items():
        dev.setup_queue(index, queue_size, vector)
    dev.set_config_vector(config_vector)
    dev.driver_ok()
    return dev


@pytest.fixture
def rng(lab):
    dev = bring_up(lab, RNG_SLOT, {0: 0}, config_vector=1)
    lab.agent.take_irqs()
    return dev


def python_msis(lab) -> dict:
    """The userspace ITS model's count of MSIs it translated in Python (none for the kernel's)."""
    model = getattr(lab.machine.its, "model", None)
    return {} if model is None else {"model_msis": model.stats()["msis"]}


def slot_of(lab, name):
    return lab.machine.pci_devices[name]


def test_enumeration_and_bar_sizing_through_ecam(lab):
    assert not function(lab, 0).present                           # slot 0 is empty: all ones
    assert function(lab, BLK_SLOT).ids() == (VIRTIO_PCI_VENDOR_ID, VIRTIO_PCI_MODERN_DEVICE_ID_BASE + VIRTIO_ID_BLOCK)
    rng_fn = function(lab, RNG_SLOT)
    assert rng_fn.ids() == (VIRTIO_PCI_VENDOR_ID, VIRTIO_PCI_MODERN_DEVICE_ID_BASE + VIRTIO_ID_RNG)
    assert rng_fn.bar_size(VIRTIO_BAR) == VIRTIO_BAR_SIZE and rng_fn.bar_size(MSIX_BAR) == 0x1000
    assert function(lab, 31).read(0, 4) == 0xFFFF_FFFF


def test_a_request_notified_by_ioeventfd_completes_with_an_lpi_through_the_its(lab, rng):
    """The whole path: the guest's notify write is taken by KVM (ioeventfd), the device thread
    fills the buffer, the used-buffer notification fires MSI-X vector 0's irqfd, KVM translates
    (RNG DeviceID, event 0) through the ITS to LPI RNG_QUEUE_LPI on vCPU 2, which takes it."""
    slot = slot_of(lab, "virtio-rng")
    stats = dict(lab.machine.its.stats(), **python_msis(lab))
    notified = slot.notifier.notifications
    buf = lab.heap.alloc(64, 64)
    q = rng.queues[0]
    head = q.add([(buf, 64, True)])
    rng.notify(0)
    lab.expect(cpu=2, intid=RNG_QUEUE_LPI)
    assert q.take_used() == [(head, 64)]
    assert lab.machine.ram.read(buf, 64) != bytes(64)
    assert slot.notifier.notifications == notified + 1             # the ioeventfd, not an MMIO exit
    assert slot.function.msix.latched == 0
    after = dict(lab.machine.its.stats(), **python_msis(lab))
    for counter in ("model_msis", "msis_injected", "slow_path_msis"):   # userspace ITS: no Python per MSI
        assert after.get(counter) == stats.get(counter), (counter, stats, after)


def test_a_masked_vector_latches_in_the_pba_and_is_sent_on_unmask(lab, rng):
    q = rng.queues[0]
    rng.msix.mask(0)
    q.add([(lab.heap.alloc(16, 16), 16, True)])
    rng.notify(0)
    lab.expect_none(0.5)
    assert rng.msix.pending(0)
    rng.msix.mask(0, False)
    lab.expect(cpu=2, intid=RNG_QUEUE_LPI)
    assert not rng.msix.pending(0)
    # the function mask too
    rng.msix.control(enable=True, mask_all=True)
    q.add([(lab.heap.alloc(16, 16), 16, True)])
    rng.notify(0)
    lab.expect_none(0.5)
    rng.msix.control(enable=True)
    lab.expect(cpu=2, intid=RNG_QUEUE_LPI)


def test_movi_moves_the_vector_s_next_interrupt(lab, rng):
    lab.its.movi(RNG_DEVID, 0, icid=3)
    try:
        rng.queues[0].add([(lab.heap.alloc(16, 16), 16, True)])
        rng.notify(0)
        lab.expect(cpu=3, intid=RNG_QUEUE_LPI)
    finally:
        lab.its.movi(RNG_DEVID, 0, icid=2)


def test_virtio_blk_writes_the_host_file_and_reads_it_back(lab):
    dev = bring_up(lab, BLK_SLOT, {0: 1, 1: 2}, config_vector=0, queue_size=16)
    lab.agent.take_irqs()
    heap, ram = lab.heap, lab.machine.ram
    pattern = os.urandom(4096)
    header, data, status = heap.alloc(16, 16), heap.alloc(4096, 4096), heap.alloc(1, 16)
    ram.write(header, (VIRTIO_BLK_T_OUT).to_bytes(4, "little") + bytes(4) + (8).to_bytes(8, "little"))
    ram.write(data, pattern)
    q1 = dev.queues[1]
    head = q1.add([(header, 16, False), (data, 4096, False), (status, 1, True)])
    dev.notify(1)
    lab.expect(cpu=2, intid=LPI_BASE + 202)                        # queue 1: vector 2, event 2, vCPU 2
    assert q1.take_used() == [(head, 1)] and ram.read(status, 1) == b"\0"
    assert lab.disk.read_bytes()[8 * 512:8 * 512 + 4096] == pattern
    back = heap.alloc(4096, 4096)
    ram.write(header, (VIRTIO_BLK_T_IN).to_bytes(4, "little") + bytes(4) + (8).to_bytes(8, "little"))
    q0 = dev.queues[0]
    head = q0.add([(header, 16, False), (back, 4096, True), (status, 1, True)])
    dev.notify(0)
    lab.expect(cpu=1, intid=LPI_BASE + 201)                        # queue 0: vector 1, vCPU 1
    assert q0.take_used() == [(head, 4097)] and ram.read(back, 4096) == pattern


# -- a hostile driver ------------------------------------------------------------------------------
def test_a_descriptor_loop_sets_needs_reset_and_sends_the_config_interrupt(lab, rng):
    q = rng.queues[0]
    buf = lab.heap.alloc(16, 16)
    q.write_desc(0, buf, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    q.write_desc(1, buf, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)     # 0 -> 1 -> 0 -> ...
    q.make_available(0)
    rng.notify(0)
    lab.expect(cpu=1, intid=RNG_CONFIG_LPI)                           # 2.1.2: config change notification
    assert rng.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert slot_of(lab, "virtio-rng").function.needs_reset
    rng.initialize()                                                  # a reset recovers the device
    assert not rng.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_bars_over_the_gic_or_each_other_are_refused_and_the_vm_goes_on(lab, rng):
    host = lab.machine.pci
    blk = function(lab, BLK_SLOT)
    blk.place_bar(VIRTIO_BAR, bar_base(BLK_SLOT))
    blk.enable()
    fn = function(lab, RNG_SLOT)
    before = host.bar_refusals
    fn.place_bar(VIRTIO_BAR, GICD_BASE)                               # outside the window, over the GIC
    assert host.bar_refusals > before
    assert lab.gic.lpis_supported(0)                                  # the GIC still answers
    fn.place_bar(VIRTIO_BAR, bar_base(BLK_SLOT))                      # over the disk's BAR 0
    assert host.bar_refusals > before + 1
    fn.place_bar(VIRTIO_BAR, bar_base(RNG_SLOT))                      # back: it works again
    rng.initialize()
    assert lab.agent.ping(0, 7) == 7


def test_an_msix_message_to_nowhere_is_dropped_and_counted(lab, rng):
    sink = slot_of(lab, "virtio-rng").function.msix.sink
    dropped = sink.bad_address
    rng.msix.set_vector(0, 0x4000_0000, 0)                            # a "DMA write" into RAM
    rng.queues[0].add([(lab.heap.alloc(16, 16), 16, True)])
    rng.notify(0)
    lab.expect_none(0.5)
    assert sink.bad_address == dropped + 1
    rng.msix.set_vector(0, lab.its.doorbell, 0)


def test_config_space_accesses_of_every_width_never_break_the_function(lab):
    fn = function(lab, RNG_SLOT)
    ids = fn.ids()
    for offset in range(0, 0x100, 3):
        for width in (1, 2, 4):
            value = fn.read(offset, width)
            fn.write(offset, value ^ 0x5A5A5A5A & ((1 << 8 * width) - 1), width)
    fn.write(0x1000 - 2, 0xFFFF, 2)                                   # the last bytes of the 4 KiB
    assert fn.ids() == ids
    assert lab.agent.ping(0, 3) == 3


def test_a_4_gib_request_and_a_notify_for_no_queue_are_refused_and_the_device_goes_on(lab):
    """A read into a buffer of nearly 4 GiB (the chain stays within 2.7.5.2's 2**32 bytes, so
    the queue is sound; the request is not): IOERR, nothing touched, the next request works."""
    dev = bring_up(lab, BLK_SLOT, {0: 1, 1: 2}, config_vector=0, queue_size=16)
    lab.agent.take_irqs()
    function = slot_of(lab, "virtio-blk0").function
    dropped = function.dropped_notifies
    dev.notify(5, dev.notify_address(1) + 4 * 4)                      # queue 5's address: no such queue
    lab.expect_none(0.3)
    assert function.dropped_notifies == dropped + 1
    heap, ram = lab.heap, lab.machine.ram
    header, status = heap.alloc(16, 16), heap.alloc(1, 16)
    ram.write(header, (VIRTIO_BLK_T_IN).to_bytes(4, "little") + bytes(12))
    before = lab.disk.read_bytes()
    q = dev.queues[0]
    head = q.add([(header, 16, False), (heap.alloc(4096, 4096), 0xFFFF_0000, True), (status, 1, True)])
    dev.notify(0)
    lab.expect(cpu=1, intid=LPI_BASE + 201)
    assert q.take_used() == [(head, 1)] and ram.read(status, 1) == b"\1"   # VIRTIO_BLK_S_IOERR
    assert lab.disk.read_bytes() == before
    ram.write(header, (VIRTIO_BLK_T_IN).to_bytes(4, "little") + bytes(12))
    back = heap.alloc(512, 512)
    head = q.add([(header, 16, False), (back, 512, True), (status, 1, True)])
    dev.notify(0)                                                     # and the next request works
    lab.expect(cpu=1, intid=LPI_BASE + 201)
    assert q.take_used() == [(head, 513)] and ram.read(status, 1) == b"\0"
