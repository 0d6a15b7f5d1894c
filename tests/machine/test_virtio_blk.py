"""virtio-blk (virtio 1.2, 5.2) on a host file, through a real VirtioPciFunction and a driver
written here: the configuration, each request type and status, the bounds, the chains a
device cannot complete, and a property test of a hostile driver's chains."""

from __future__ import annotations

import logging
import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmits.machine.devices.virtio import blk as B
from kvmits.machine.devices.virtio import pci as V
from kvmits.machine.devices.virtio.blk import (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
                                               VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
                                               VIRTIO_BLK_T_OUT, VirtioBlk)
from kvmits.machine.devices.virtio.pci import VirtioPciFunction
from kvmits.machine.devices.virtio.virtqueue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from kvmits.machine.pci import config as P
from tests.machine.pci_fakes import RecordingMsixSink
from tests.machine.virtio_fakes import BASE, RAM_SIZE, Driver, FakeRam

SECTORS = 64
TAIL = 100                           # bytes past the last whole sector: not part of the disk


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes repeating with a period of 251 (a prime), so no two sectors look alike."""
    period = bytes((seed + 7 * i) & 0xFF for i in range(251))
    return (period * (n // 251 + 1))[:n]


def disk_file(tmp_path, name="disk.img", sectors=SECTORS, tail=TAIL) -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(pattern(sectors * 512 + tail, seed=3))
    return path


class Rig:
    """A VirtioBlk on a VirtioPciFunction, brought up by the driver."""

    def __init__(self, path, *, features=None, sizes=None, **kw):
        self.ram, self.sink = FakeRam(), RecordingMsixSink()
        self.dev = VirtioBlk(path, **kw)
        self.fn = VirtioPciFunction(self.dev, self.ram, self.sink, name="blk")
        self.dev.function = self.fn
        self.drv = Driver(self.fn, self.ram, features=features)
        self.features = self.drv.bring_up(sizes)
        self.sink.calls.clear()
        self.path = path

    def close(self):
        self.dev.close()

    def header(self, rtype, sector=0) -> int:
        gpa = self.drv.alloc(16)
        self.ram.poke(gpa, "IIQ", rtype, 0, sector)
        return gpa

    def request(self, rtype, sector=0, *, out=(), into=(), q=0, kick=True, indirect=False):
        """Submit header + the device-readable `out` data + writable buffers of the lengths
        `into` + a status byte (0xEE until the device writes it). Returns (head, [gpa of each
        `into` buffer], status gpa)."""
        bufs = [(self.header(rtype, sector), 16, False)]
        for data in out:
            gpa = self.drv.alloc(len(data))
            self.ram.put(gpa, data)
            bufs.append((gpa, len(data), False))
        targets = []
        for n in into:
            targets.append(self.drv.alloc(n, fill=0xEE))
            bufs.append((targets[-1], n, True))
        status = self.drv.alloc(1, fill=0xEE)
        bufs.append((status, 1, True))
        head = self.drv.submit(q, bufs, indirect=indirect)
        if kick:
            self.drv.kick(q)
        return head, targets, status

    def status(self, gpa) -> int:
        return self.ram.get(gpa, 1)[0]

    def file(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    @property
    def needs_reset(self) -> bool:
        return bool(self.drv.status & V.VIRTIO_CONFIG_S_NEEDS_RESET)


@pytest.fixture
def rig(tmp_path):
    rigs = []

    def make(path=None, **kw):
        rigs.append(Rig(path or disk_file(tmp_path), **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


# -- the device and its configuration ---------------------------------------------------------------
def test_a_block_device_on_pci_with_its_features(rig):
    r = rig()
    assert r.fn.config.read(P.PCI_DEVICE_ID, 2) == 0x1042              # 0x1040 + 2 (4.1.2.1)
    assert r.fn.num_queues == 1 and r.fn.queues[0].max_size == B.DEFAULT_QUEUE_SIZE
    want = {B.VIRTIO_BLK_F_SIZE_MAX, B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_BLK_SIZE, B.VIRTIO_BLK_F_FLUSH,
            VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX, V.VIRTIO_F_VERSION_1}
    assert r.drv.offered() == sum(1 << b for b in want)                  # no RO, no MQ, no CONFIG_WCE


def test_the_configuration_space_is_struct_virtio_blk_config(rig):
    """5.2.4: capacity in whole sectors (the tail is not exposed), size_max, seg_max,
    blk_size, num_queues; read at any offset and width; writes ignored (no CONFIG_WCE)."""
    r = rig()
    cfg = r.drv.config
    assert cfg(B.VIRTIO_BLK_CFG_CAPACITY, 8) == SECTORS == r.dev.capacity
    assert cfg(B.VIRTIO_BLK_CFG_SIZE_MAX, 4) == B.SIZE_MAX
    assert cfg(B.VIRTIO_BLK_CFG_SEG_MAX, 4) == B.DEFAULT_QUEUE_SIZE - 2
    assert cfg(B.VIRTIO_BLK_CFG_GEOMETRY, 4) == 0 and cfg(B.VIRTIO_BLK_CFG_TOPOLOGY, 8) == 0
    assert cfg(B.VIRTIO_BLK_CFG_BLK_SIZE, 4) == 512
    assert cfg(B.VIRTIO_BLK_CFG_WRITEBACK, 1) == 1                       # FLUSH negotiated: writeback
    assert cfg(B.VIRTIO_BLK_CFG_UNUSED0, 1) == 0
    assert cfg(B.VIRTIO_BLK_CFG_NUM_QUEUES, 2) == 1
    raw = b"".join(cfg(i, 1).to_bytes(1, "little") for i in range(B.VIRTIO_BLK_CONFIG_SIZE))
    assert raw[:8] == SECTORS.to_bytes(8, "little")
    for offset, size in ((1, 2), (7, 2), (9, 4), (30, 4), (32, 4), (35, 1)):
        assert cfg(offset, size) == int.from_bytes(raw[offset:offset + size], "little")
    assert cfg(34, 4) == 0                                               # past config_size: the transport
    r.drv.write_config(B.VIRTIO_BLK_CFG_WRITEBACK, 1, 0)
    r.drv.write_config(B.VIRTIO_BLK_CFG_CAPACITY, 4, 0xFFFF)
    assert cfg(B.VIRTIO_BLK_CFG_WRITEBACK, 1) == 1 and cfg(0, 8) == SECTORS
    assert r.dev.ignored_config_writes == 2


def test_a_bad_constructor_argument_is_refused(tmp_path):
    path = disk_file(tmp_path)
    for kw in ({"num_queues": 0}, {"queue_size": 12}, {"queue_size": 2}, {"serial": "x" * 21}):
        with pytest.raises(ValueError):
            VirtioBlk(path, **kw)
    with pytest.raises(FileNotFoundError):
        VirtioBlk(os.path.join(tmp_path, "missing.img"))                # never created
    assert not os.path.exists(os.path.join(tmp_path, "missing.img"))


# -- reads and writes ----------------------------------------------------------------------------
def test_a_write_then_a_read_back_through_odd_buffers(rig):
    r = rig()
    data = pattern(3 * 512, seed=99)
    head, _, st = r.request(VIRTIO_BLK_T_OUT, 5, out=(data[:700], data[700:]))
    assert r.drv.reap(0) == [(head, 1)] and r.status(st) == VIRTIO_BLK_S_OK
    assert r.file()[5 * 512:8 * 512] == data
    assert r.sink.calls == [("fire", 1)]
    head, (a, b), st = r.request(VIRTIO_BLK_T_IN, 5, into=(1000, 536))
    assert r.drv.reap(0) == [(head, 1536 + 1)]                           # data and the status byte
    assert r.status(st) == VIRTIO_BLK_S_OK and r.ram.get(a, 1000) + r.ram.get(b, 536) == data
    assert (r.dev.writes, r.dev.reads, r.dev.bytes_written, r.dev.bytes_read) == (1, 1, 1536, 1536)
    assert r.dev.io_errors == 0 and r.sink.calls == [("fire", 1), ("fire", 1)]


def test_the_header_may_be_split_and_share_buffers_and_the_status_may_share_one(rig):
    """2.7.4: the device MUST NOT assume an arrangement of descriptors."""
    r = rig()
    data = pattern(512, seed=5)
    hdr = struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 2)
    first = r.drv.alloc(10)
    rest = r.drv.alloc(6 + 512)
    r.ram.put(first, hdr[:10])
    r.ram.put(rest, hdr[10:] + data)
    st = r.drv.alloc(1, fill=0xEE)
    head = r.drv.submit(0, [(first, 10, False), (rest, 6 + 512, False), (st, 1, True)])
    r.drv.kick(0)
    assert r.drv.reap(0) == [(head, 1)] and r.status(st) == VIRTIO_BLK_S_OK
    assert r.file()[1024:1536] == data
    hdr_in = r.header(VIRTIO_BLK_T_IN, 2)
    both = r.drv.alloc(513, fill=0xEE)                                  # data + status in one buffer
    head = r.drv.submit(0, [(hdr_in, 16, False), (both, 513, True)], indirect=True)
    r.drv.kick(0)
    assert r.drv.reap(0) == [(head, 513)]
    assert r.ram.get(both, 512) == data and r.ram.get(both + 512, 1)[0] == VIRTIO_BLK_S_OK


def test_a_large_request_moves_in_size_max_pieces(rig, tmp_path):
    n = 2 * B.SIZE_MAX + 3 * 512
    r = rig(disk_file(tmp_path, name="big.img", sectors=n // 512 + 8), queue_size=16, sizes={0: 16})
    data = pattern(n, seed=1)
    head, _, st = r.request(VIRTIO_BLK_T_OUT, 0, out=(data,))
    assert r.drv.reap(0) == [(head, 1)] and r.status(st) == VIRTIO_BLK_S_OK
    assert r.file()[:n] == data
    head, (a,), st = r.request(VIRTIO_BLK_T_IN, 0, into=(n,))
    assert r.drv.reap(0) == [(head, n + 1)] and r.ram.get(a, n) == data
    pieces = [length for gpa, length in r.ram.writes if a <= gpa < a + n]
    assert max(pieces) <= B.SIZE_MAX and sum(pieces) == n


def test_out_of_range_and_unaligned_requests_are_ioerr(rig):
    """5.2.6.1: a driver MUST NOT go past capacity and moves whole sectors; the device says
    VIRTIO_BLK_S_IOERR and touches nothing."""
    r = rig()
    before = r.file()
    cases = [(VIRTIO_BLK_T_IN, SECTORS - 1, (512,), ()),               # the last sector: fine
             (VIRTIO_BLK_T_IN, SECTORS, (512,), ()),                   # the tail bytes are not a sector
             (VIRTIO_BLK_T_IN, SECTORS - 1, (1024,), ()),
             (VIRTIO_BLK_T_IN, (1 << 64) - 1, (512,), ()),
             (VIRTIO_BLK_T_IN, 0, (100,), ()),
             (VIRTIO_BLK_T_OUT, SECTORS, (), (b"x" * 512,)),
             (VIRTIO_BLK_T_OUT, 0, (), (b"x" * 511,))]
    got = []
    for rtype, sector, into, out in cases:
        head, targets, st = r.request(rtype, sector, into=into, out=out)
        (used,) = r.drv.reap(0)
        got.append((r.status(st), used[1]))
    assert got == [(VIRTIO_BLK_S_OK, 513)] + [(VIRTIO_BLK_S_IOERR, 1)] * 6
    assert r.file() == before and r.dev.io_errors == 6


def test_a_read_only_disk_refuses_writes_and_keeps_the_file(rig, caplog):
    """5.2.6.2: IOERR for a write when VIRTIO_BLK_F_RO is offered, "and MUST NOT write any data"
    (refused by the device, not by the host file opened read-only, which logs a failure)."""
    caplog.set_level(logging.WARNING)
    r = rig(readonly=True)
    assert r.features >> B.VIRTIO_BLK_F_RO & 1
    before = r.file()
    head, _, st = r.request(VIRTIO_BLK_T_OUT, 0, out=(b"\0" * 512,))
    assert r.drv.reap(0) == [(head, 1)] and r.status(st) == VIRTIO_BLK_S_IOERR
    assert r.file() == before and r.dev.bytes_written == 0
    head, (a,), st = r.request(VIRTIO_BLK_T_IN, 1, into=(512,))
    assert r.status(st) == VIRTIO_BLK_S_OK and r.ram.get(a, 512) == before[512:1024]
    head, _, st = r.request(VIRTIO_BLK_T_FLUSH)
    assert r.status(st) == VIRTIO_BLK_S_OK
    assert not caplog.records


def test_after_close_requests_fail_with_ioerr(rig):
    r = rig()
    r.dev.close()
    head, _, st = r.request(VIRTIO_BLK_T_IN, 0, into=(512,))
    assert r.status(st) == VIRTIO_BLK_S_IOERR and r.drv.reap(0) == [(head, 1)]
    r.dev.close()                                                        # twice is fine


# -- flush, get-id, the rest ----------------------------------------------------------------------
def test_flush_and_write_through(rig, monkeypatch):
    """FLUSH syncs the file. 5.2.6.2: without FLUSH negotiated (but offered) every completed
    write is stable, so the device syncs each one; with it negotiated, only FLUSH does."""
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    r = rig()
    r.request(VIRTIO_BLK_T_OUT, 0, out=(b"a" * 512,))
    assert synced == []
    head, _, st = r.request(VIRTIO_BLK_T_FLUSH)
    assert r.status(st) == VIRTIO_BLK_S_OK and len(synced) == 1 and r.dev.flushes == 1
    assert r.drv.reap(0)[-1] == (head, 1)
    plain = rig(features=~(1 << B.VIRTIO_BLK_F_FLUSH))
    assert not plain.features >> B.VIRTIO_BLK_F_FLUSH & 1
    assert plain.drv.config(B.VIRTIO_BLK_CFG_WRITEBACK, 1) == 0          # writethrough
    head, _, st = plain.request(VIRTIO_BLK_T_OUT, 1, out=(b"b" * 512,))
    assert plain.status(st) == VIRTIO_BLK_S_OK and len(synced) == 2


def test_a_failing_sync_is_ioerr(rig, monkeypatch):
    r = rig()

    def fail(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", fail)
    head, _, st = r.request(VIRTIO_BLK_T_FLUSH)
    assert r.status(st) == VIRTIO_BLK_S_IOERR and r.dev.io_errors == 1


def test_get_id_gives_the_serial_nul_padded(rig, tmp_path):
    """5.2.6: a NUL-padded ASCII string up to 20 bytes, no NUL at 20 bytes."""
    r = rig(disk_file(tmp_path, name="a-rather-long-disk-name.img"))
    head, (a,), st = r.request(VIRTIO_BLK_T_GET_ID, into=(20,))
    assert r.drv.reap(0) == [(head, 21)] and r.status(st) == VIRTIO_BLK_S_OK
    assert r.ram.get(a, 20) == b"a-rather-long-disk-n" and r.dev.get_ids == 1
    s = rig(disk_file(tmp_path, name="other.img"), serial="sn-1")
    head, (a,), st = s.request(VIRTIO_BLK_T_GET_ID, into=(20,))
    assert s.ram.get(a, 20) == b"sn-1" + b"\0" * 16
    head, (a,), st = s.request(VIRTIO_BLK_T_GET_ID, into=(3,))            # a short buffer: its bytes
    assert s.drv.reap(0)[-1] == (head, 4) and s.ram.get(a, 3) == b"sn-"


def test_other_request_types_are_unsupported(rig):
    r = rig()
    for rtype in (2, 5, 10, 11, 13, 14, 16, 0x8000_0000, 0xFFFF_FFFF):     # SCSI, legacy, discard, zones
        head, _, st = r.request(rtype, 0, into=(16,))
        assert r.status(st) == VIRTIO_BLK_S_UNSUPP and r.drv.reap(0) == [(head, 1)]
    assert r.dev.unsupported == 9 and r.dev.io_errors == 0


# -- multiple queues -------------------------------------------------------------------------------
def test_two_queues_each_serve_requests_on_their_own_vector(rig):
    r = rig(num_queues=2, queue_size=8)
    assert r.features >> B.VIRTIO_BLK_F_MQ & 1
    assert r.drv.config(B.VIRTIO_BLK_CFG_NUM_QUEUES, 2) == 2 == r.fn.num_queues
    h0, _, s0 = r.request(VIRTIO_BLK_T_OUT, 1, out=(b"0" * 512,), q=0)
    h1, (a,), s1 = r.request(VIRTIO_BLK_T_IN, 1, into=(512,), q=1)
    assert r.drv.reap(0) == [(h0, 1)] and r.drv.reap(1) == [(h1, 513)]
    assert r.status(s0) == r.status(s1) == VIRTIO_BLK_S_OK and r.ram.get(a, 512) == b"0" * 512
    assert r.sink.calls == [("fire", 1), ("fire", 2)]


def test_one_notify_serves_more_requests_than_the_queue_holds(rig):
    """Rounds of at most the queue size, as long as the driver keeps adding requests (here
    while the device works: each status byte it writes lets the driver reap and add one)."""
    r = rig(queue_size=4, sizes={0: 4})
    added = []

    def on_write(gpa, n):
        lo, hi = r.drv.used_area(0)
        if not lo <= gpa < hi and n == 1:
            r.drv.reap(0)
            if len(added) < 12 and r.drv.can_submit(0):
                added.append(r.request(VIRTIO_BLK_T_GET_ID, into=(20,), indirect=True, kick=False)[0])
    for _ in range(4):
        r.request(VIRTIO_BLK_T_GET_ID, into=(20,), indirect=True, kick=False)
    r.ram.on_write = on_write
    r.drv.kick(0)
    r.ram.on_write = None
    r.drv.reap(0)
    assert len(added) == 12 and r.dev.get_ids == 16 and r.drv.rings[0].last_used == 16


# -- bounds ------------------------------------------------------------------------------------------
def test_more_data_than_seg_max_times_size_max_is_ioerr_untouched(rig, tmp_path):
    too_much = 6 * B.SIZE_MAX + 512
    r = rig(disk_file(tmp_path, name="big.img", sectors=too_much // 512 + 8), queue_size=8, sizes={0: 8})
    assert r.drv.config(B.VIRTIO_BLK_CFG_SEG_MAX, 4) == 6
    hdr = r.header(VIRTIO_BLK_T_IN, 0)
    st = r.drv.alloc(1, fill=0xEE)
    # the buffer covers the rings: the device must not even look at it
    head = r.drv.submit(0, [(hdr, 16, False), (BASE, too_much, True), (st, 1, True)])
    r.ram.writes.clear()
    r.drv.kick(0)
    assert r.drv.reap(0) == [(head, 1)] and r.status(st) == VIRTIO_BLK_S_IOERR
    used = r.drv.used_area(0)
    assert all(gpa == st or used[0] <= gpa < used[1] for gpa, _ in r.ram.writes)


def test_more_buffers_than_seg_max_allows_is_ioerr(rig, tmp_path):
    """seg_max is capped (SEG_MAX_LIMIT): a chain of more than seg_max + 2 buffers, possible
    through an indirect table on a large queue, is refused."""
    r = rig(disk_file(tmp_path, name="big.img", sectors=512), queue_size=512, sizes={0: 512})
    assert r.dev.seg_max == B.SEG_MAX_LIMIT
    ok, _, st_ok = r.request(VIRTIO_BLK_T_IN, 0, into=(512,) * B.SEG_MAX_LIMIT, indirect=True)
    bad, _, st_bad = r.request(VIRTIO_BLK_T_IN, 0, into=(512,) * (B.SEG_MAX_LIMIT + 1), indirect=True)
    assert r.drv.reap(0) == [(ok, 512 * B.SEG_MAX_LIMIT + 1), (bad, 1)]
    assert r.status(st_ok) == VIRTIO_BLK_S_OK and r.status(st_bad) == VIRTIO_BLK_S_IOERR


def test_a_data_buffer_outside_ram_is_ioerr(rig):
    r = rig()
    hdr = r.header(VIRTIO_BLK_T_IN, 0)
    st = r.drv.alloc(1, fill=0xEE)
    head = r.drv.submit(0, [(hdr, 16, False), (BASE + RAM_SIZE - 256, 512, True), (st, 1, True)])
    hdr_out = r.header(VIRTIO_BLK_T_OUT, 0)
    st2 = r.drv.alloc(1, fill=0xEE)
    head2 = r.drv.submit(0, [(hdr_out, 16, False), (BASE - 512, 512, False), (st2, 1, True)])
    before = r.file()
    r.drv.kick(0)
    assert r.drv.reap(0) == [(head, 1), (head2, 1)]
    assert r.status(st) == r.status(st2) == VIRTIO_BLK_S_IOERR
    assert r.file() == before and not r.needs_reset


def test_a_header_outside_ram_is_ioerr(rig):
    r = rig()
    st = r.drv.alloc(1, fill=0xEE)
    head = r.drv.submit(0, [(BASE + RAM_SIZE, 16, False), (st, 1, True)])
    r.drv.kick(0)
    assert r.drv.reap(0) == [(head, 1)] and r.status(st) == VIRTIO_BLK_S_IOERR


# -- chains the device cannot complete --------------------------------------------------------------
@pytest.mark.parametrize("shape", ["no-status", "short-header", "header-writable", "status-outside-ram"])
def test_a_chain_that_cannot_be_completed_sets_needs_reset_and_stops_the_queue(rig, shape):
    r = rig()
    hdr = r.header(VIRTIO_BLK_T_IN, 0)
    st = r.drv.alloc(1, fill=0xEE)
    bufs = {"no-status": [(hdr, 16, False)],
            "short-header": [(hdr, 8, False), (st, 1, True)],
            "header-writable": [(hdr, 16, True), (st, 1, True)],
            "status-outside-ram": [(hdr, 16, False), (BASE + RAM_SIZE, 1, True)]}[shape]
    r.drv.submit(0, bufs)
    r.drv.kick(0)
    assert r.needs_reset and r.fn.needs_reset == {B.BLK_BAD_REQUEST: 1} and r.dev.bad_requests == 1
    assert r.drv.reap(0) == [] and r.sink.calls == [("fire", 0)]           # config vector, no push
    r.request(VIRTIO_BLK_T_IN, 0, into=(512,))                              # the queue stays stopped
    assert r.drv.reap(0) == [] and r.dev.bad_requests == 1
    r.drv.bring_up()                                                        # until the driver resets
    head, _, st = r.request(VIRTIO_BLK_T_IN, 0, into=(512,))
    assert r.drv.reap(0) == [(head, 513)] and r.status(st) == VIRTIO_BLK_S_OK and not r.needs_reset


def test_a_queue_dropped_by_a_reset_is_not_served(rig):
    r = rig()
    vq = r.fn.queue(0)
    r.request(VIRTIO_BLK_T_IN, 0, into=(512,), kick=False)
    used_idx = r.drv.rings[0].used + 2
    r.drv.reset()
    r.dev.notify(0, vq)                                  # a notify that raced with the reset
    assert r.ram.peek(used_idx, "H") == (0,) and r.dev.reads == 0


# -- a hostile driver ---------------------------------------------------------------------------------
ADDR = st.one_of(st.integers(BASE + 0x20_0000, BASE + 0x30_0000),          # the test heap's upper part
                 st.sampled_from([BASE + RAM_SIZE - 8, BASE + RAM_SIZE, BASE - 8, 0, (1 << 64) - 16]))
LENGTH = st.one_of(st.integers(0, 1100), st.sampled_from([511, 512, 513, 1 << 20, 0xFFFF_FFFF]))
BUFFER = st.tuples(ADDR, LENGTH, st.booleans())
HEADER = st.tuples(st.sampled_from([0, 1, 4, 8, 3, 0xFFFF_FFFF]), st.integers(0, 0xFFFF_FFFF),
                   st.one_of(st.integers(0, SECTORS + 2), st.just((1 << 64) - 1)))
CHAIN = st.tuples(HEADER, st.integers(1, 16), st.lists(BUFFER, max_size=6), st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CHAIN, min_size=1, max_size=6), st.booleans())
def test_garbage_chains_never_raise_and_writes_stay_in_writable_buffers(chains, sort):
    """Whatever chains a driver makes available, notify returns, the device writes only into
    the chains' device-writable buffers and its used ring, returns each chain at most once
    with no more than its writable bytes, never grows the file, and returns every chain
    unless it set DEVICE_NEEDS_RESET."""
    with tempfile.TemporaryDirectory() as tmp:
        path = disk_file(tmp)
        r = Rig(path, queue_size=16)
        try:
            size = os.path.getsize(path)
            writable: list[tuple[int, int]] = []
            totals = {}
            for (rtype, reserved, sector), header_split, bufs, indirect in chains:
                if not r.drv.can_submit(0, 1 if indirect else len(bufs) + 2):
                    break
                hdr = r.drv.alloc(16)
                r.ram.poke(hdr, "IIQ", rtype, reserved, sector)
                cut = min(header_split, 16)
                head_bufs = [(hdr, cut, False)] + ([(hdr + cut, 16 - cut, False)] if cut < 16 else [])
                chain = head_bufs + list(bufs)
                if sort:
                    chain.sort(key=lambda b: b[2])             # readable first, as a driver must
                head = r.drv.submit(0, chain, indirect=indirect, publish=False)
                totals[head] = sum(n for _, n, w in chain if w)
                writable += [(gpa, n) for gpa, n, w in chain if w]
            r.drv.publish(0)
            r.ram.writes.clear()
            r.drv.kick(0)
            lo, hi = r.drv.used_area(0)
            for gpa, n in r.ram.writes:
                assert lo <= gpa and gpa + n <= hi or any(g <= gpa and gpa + n <= g + m for g, m in writable)
            seen = set()
            for head, length in r.drv.reap(0):
                assert head not in seen and length <= totals[head]
                seen.add(head)
            assert len(seen) == len(totals) or r.needs_reset
            assert os.path.getsize(path) == size
        finally:
            r.close()


def test_msix_vectors_sets_the_table_size_and_is_bounded_by_the_queues(tmp_path):
    """Disk.vectors / msix_vectors: one vector per queue plus one by default; 2 for two queues
    (Linux then shares one vector among the queues, kvmits bench part 5's movable vector)."""
    path = disk_file(tmp_path)
    devices = [VirtioBlk(path, num_queues=2), VirtioBlk(path, num_queues=2, msix_vectors=2),
               VirtioBlk(path, num_queues=1, msix_vectors=3)]
    try:
        default, shared = (VirtioPciFunction(d, FakeRam(), RecordingMsixSink(), name="x") for d in devices[:2])
        assert (default.msix.vectors, shared.msix.vectors) == (3, 2)
        with pytest.raises(ValueError, match="3 MSI-X vectors for 1 queues"):
            VirtioPciFunction(devices[2], FakeRam(), RecordingMsixSink(), name="c")
    finally:
        for d in devices:
            d.close()
