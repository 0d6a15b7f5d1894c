"""Save and restore of a virtio-pci function (issue 13): a virtio-blk brought up by the test
driver, saved mid-conversation (a request done, one published but not yet notified, MSI-X on),
restored into a new function over the same guest RAM (as an in-process migration hands it
over), which then serves the waiting request on the same rings; and the states refused."""

from __future__ import annotations

import copy
import json

import pytest

from kvmits.machine.devices.virtio import pci as V
from kvmits.machine.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlk
from kvmits.machine.devices.virtio.pci import VirtioPciFunction
from kvmits.machine.devices.virtio.rng import VirtioRng
from kvmits.machine.pci import msix as M
from tests.machine.pci_fakes import RecordingMsixSink
from tests.machine.test_device_state import _set
from tests.machine.test_virtio_blk import Rig, disk_file, pattern


def through_json(state):
    return json.loads(json.dumps(state))


def common_view(fn: VirtioPciFunction) -> dict:
    """Every common configuration register as the driver reads it, per queue."""
    out = {}
    for q in range(fn.num_queues):
        fn.bar_write(0, V.VIRTIO_BAR, V.COMMON_CFG_OFFSET + V.VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
        out[q] = [fn.bar_read(0, V.VIRTIO_BAR, V.COMMON_CFG_OFFSET + off, 4) for off in range(0, 0x3C, 4)]
    return out


def destination(path, ram, **kw):
    sink = RecordingMsixSink()
    dev = VirtioBlk(path, **kw)
    fn = VirtioPciFunction(dev, ram, sink, name="blk")
    dev.function = fn
    return dev, fn, sink


@pytest.fixture
def source(tmp_path):
    rig = Rig(disk_file(tmp_path), num_queues=2)
    yield rig
    rig.close()


def test_a_blk_function_carries_on_after_a_restore(source):
    src = source
    head, _, status = src.request(VIRTIO_BLK_T_OUT, 2, out=[pattern(512, seed=9)])
    assert src.status(status) == VIRTIO_BLK_S_OK and src.drv.reap(0) == [(head, 1)]
    # a read published but not notified: the destination finds it (resume_queues, kick)
    waiting, targets, wstatus = src.request(VIRTIO_BLK_T_IN, 2, into=[512], kick=False)
    # vector 2 (queue 1) masked with a pending bit: carried, sent on unmask
    src.fn.bar_write(0, V.MSIX_BAR, 2 * M.PCI_MSIX_ENTRY_SIZE + M.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, 1)
    src.fn.msix.signal(2)
    assert src.fn.msix.is_pending(2)
    want = common_view(src.fn)
    config = bytes(src.fn.config.data)
    state = through_json(src.fn.save_state())
    assert state["format"] == "kvmits-virtio-pci"
    assert state["queues"][0]["vq"]["used_idx"] == 1 and state["queues"][0]["vq"]["last_avail_idx"] == 1

    dev, fn, sink = destination(src.path, src.ram, num_queues=2)
    try:
        fn.load_state(state)
        assert bytes(fn.config.data) == config and common_view(fn) == want
        assert fn.driver_ok and fn.msix.enabled and fn.msix.is_pending(2)
        # the unmasked vectors are routed again, with the messages the driver wrote; none fired
        routed = {c[1]: c[2:] for c in sink.calls if c[0] == "route"}
        assert set(routed) == {0, 1} and routed[1] == (src.fn.msix.message(1))
        assert not [c for c in sink.calls if c[0] == "fire"]
        sink.calls.clear()
        assert fn.resume_queues() == [0, 1]              # a used-buffer interrupt each: vector 1 sent,
        assert sink.calls == [("fire", 1)]               # vector 2 masked (latched)
        assert fn.notify_queue(0)                        # the kick: the waiting read is served
        src.drv.fn = fn
        assert src.drv.reap(0) == [(waiting, 513)]
        assert src.ram.get(targets[0], 512) == pattern(512, seed=9) and src.status(wstatus) == VIRTIO_BLK_S_OK
        sink.calls.clear()
        fn.bar_write(0, V.MSIX_BAR, 2 * M.PCI_MSIX_ENTRY_SIZE + M.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, 0)
        assert ("fire", 2) in sink.calls and not fn.msix.is_pending(2)
    finally:
        dev.close()


def test_a_reset_device_restores_to_a_reset_device(tmp_path):
    src_dev, src, _ = destination(disk_file(tmp_path), None)
    state = through_json(src.save_state())
    dev, fn, sink = destination(src_dev.path, None)
    try:
        fn.load_state(state)
        assert not fn.driver_ok and fn.resume_queues() == [] and sink.calls == []
    finally:
        dev.close()
        src_dev.close()


BAD = [
    (_set(("format",), "kvmits-pl011"), "format 'kvmits-pl011' is not 'kvmits-virtio-pci'"),
    (_set(("regs", "status"), 0x30), r"regs.status 0x30 has reserved bits"),
    (_set(("regs", "isr"), 4), r"regs.isr = 0x4 is out of range"),
    (_set(("regs", "config_msix_vector"), 7), "regs.config_msix_vector 7 is not a vector"),
    (_set(("regs", "driver_features"), 1 << 63), "bits the device does not offer"),
    (_set(("queues", 0, "size"), 3), r"queues\[0\].size 3 is not a power of 2"),
    (_set(("queues", 0, "size"), 512), r"queues\[0\].size = 0x200 is out of range"),
    (_set(("queues", 0, "desc"), 0x1008), r"queues\[0\]: descriptor table at 0x1008 is not 16-byte aligned"),
    (_set(("queues", 0, "vq"), None), r"queues\[0\]: an enabled queue has a virtqueue state"),
    (_set(("queues", 0, "vq", "used_idx"), 1 << 16), r"used_idx = 0x10000 is out of range"),
    (_set(("queues", 0, "vq", "broken"), "NOT_A_REASON"), "is not a VirtqueueError reason"),
    (_set(("queues",), []), "queues: 0 saved, the device has 2"),
    (_set(("msix", "table"), "00"), "MSI-X state: table must be"),
    (_set(("config",), "00" * 4096), "PCI config space state: byte 0x0 is read-only here"),
    (_set(("device", "capacity"), 1), "virtio-blk state: the disk .* has capacity 64, the state 1"),
    (_set(("device", "stopped"), [5]), r"virtio-blk state: stopped\[\] = 0x5 is out of range"),
    (_set(("counters", "no_vector"), -1), "counters.no_vector = -0x1 is out of range"),
]


@pytest.mark.parametrize("mutate, match", BAD)
def test_a_malformed_state_is_refused_and_changes_nothing(source, mutate, match):
    source.request(VIRTIO_BLK_T_OUT, 1, out=[pattern(512)])
    state = through_json(source.fn.save_state())
    mutate(state)
    dev, fn, _ = destination(source.path, source.ram, num_queues=2)
    try:
        before = (bytes(fn.config.data), common_view(fn), bytes(fn.msix.table), fn.save_state())
        with pytest.raises(ValueError, match=match):
            fn.load_state(state)
        assert (bytes(fn.config.data), common_view(fn), bytes(fn.msix.table), fn.save_state()) == before
    finally:
        dev.close()


def test_another_device_is_refused(source):
    """An rng's state into a blk function: the read-only config bytes (device ID) differ."""
    state = through_json(VirtioPciFunction(VirtioRng(), source.ram, RecordingMsixSink()).save_state())
    dev, fn, _ = destination(source.path, source.ram)         # one queue, as the rng
    try:
        with pytest.raises(ValueError, match="read-only here"):
            fn.load_state(copy.deepcopy(state))
    finally:
        dev.close()
