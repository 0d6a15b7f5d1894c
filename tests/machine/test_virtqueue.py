"""The device side of the split virtqueue (virtio 1.2, 2.7): the rules, each bad-input class a
hostile driver can produce, and property tests against a driver written from the spec
(tests/machine/virtio_fakes.py's Ring, here on a queue of its own)."""

from __future__ import annotations

import logging
import random
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmits.errors import GuestMemoryError
from kvmits.machine.devices.virtio import virtqueue as V
from kvmits.machine.devices.virtio.virtqueue import Chain, Virtqueue, VirtqueueConfigError, VirtqueueError
from tests.machine.virtio_fakes import BASE, RAM_SIZE, FakeRam, Ring

E = VirtqueueError
NEXT, WRITE, INDIRECT = V.VIRTQ_DESC_F_NEXT, V.VIRTQ_DESC_F_WRITE, V.VIRTQ_DESC_F_INDIRECT

DESC = BASE
AVAIL = BASE + 0x8_0000
USED = BASE + 0x9_0000
TABLES = BASE + 0xA_0000         # indirect tables
BUF = BASE + 0xC_0000            # where buffer addresses point (never accessed by the queue)


class Driver(Ring):
    """The driver side (2.7.13 / 2.7.14) of a queue at DESC, AVAIL and USED: descriptors taken
    in a shuffled order (chains are not in table order), indirect tables from `next_table` up
    (TABLES at first)."""

    def __init__(self, ram: FakeRam, size: int, *, idx: int = 0, rng: random.Random | None = None):
        free = list(range(size))
        (rng or random.Random(0)).shuffle(free)
        super().__init__(ram, size, DESC, AVAIL, USED, tables=self._table, free=free, idx=idx)
        self.next_table = TABLES

    def _table(self, nbytes: int) -> int:
        table, self.next_table = self.next_table, self.next_table + nbytes
        return table


def make(size: int = 8, ram: FakeRam | None = None, idx: int = 0, **kw) -> tuple[Virtqueue, Driver, FakeRam]:
    ram = ram or FakeRam()
    d = Driver(ram, size, idx=idx)
    q = Virtqueue(ram, size, DESC, AVAIL, USED, last_avail_idx=idx, used_idx=idx, **kw)
    return q, d, ram


def raw_avail(ram: FakeRam, size: int, idx: int, *heads: int) -> None:
    """Put heads in the avail ring from entry 0 and set avail->idx (a hand-made bad ring)."""
    for k, h in enumerate(heads):
        ram.poke(AVAIL + 4 + 2 * (k % size), "H", h)
    ram.poke(AVAIL + 2, "H", idx)


# -- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 6, 100, 65536, 1 << 16 | 1, -4])
def test_a_queue_size_must_be_a_power_of_two_up_to_32768(size):
    with pytest.raises(VirtqueueConfigError):
        Virtqueue(FakeRam(), size, DESC, AVAIL, USED)


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_every_power_of_two_size_is_accepted(size):
    assert Virtqueue(FakeRam(), size, DESC, AVAIL, USED).size == size


@pytest.mark.parametrize("desc, avail, used", [(DESC + 8, AVAIL, USED), (DESC, AVAIL + 1, USED),
                                               (DESC, AVAIL, USED + 2)])
def test_misaligned_parts_are_refused(desc, avail, used):
    with pytest.raises(VirtqueueConfigError):
        Virtqueue(FakeRam(), 8, desc, avail, used)


def test_ring_sizes_follow_the_spec_table():
    assert (V.desc_table_bytes(256), V.avail_ring_bytes(256), V.used_ring_bytes(256)) == (4096, 518, 2054)


# -- pop and push ----------------------------------------------------------------------------------
def test_an_empty_queue_pops_nothing():
    q, d, ram = make()
    assert q.pop() is None
    d.publish()
    assert q.pop() is None


def test_a_direct_chain_pops_with_its_buffers_and_totals():
    q, d, _ = make()
    bufs = [(BUF, 16, False), (BUF + 0x100, 512, False), (BUF + 0x1000, 1, True)]
    head = d.add(bufs)
    d.publish()
    chain = q.pop()
    assert chain == Chain(head, bufs, 528, 1)
    assert (chain.readable, chain.writable) == (528, 1)
    assert q.pop() is None
    assert q.last_avail_idx == 1


def test_push_writes_the_element_then_advances_used_idx_little_endian():
    q, d, ram = make()
    head = d.add([(BUF, 64, True)])
    d.publish()
    assert q.pop().head == head
    assert q.push(head, 0x01020304) is None
    assert bytes(ram.buf[USED - BASE + 4:USED - BASE + 12]) == struct.pack("<II", head, 0x01020304)
    assert bytes(ram.buf[USED - BASE + 2:USED - BASE + 4]) == b"\x01\x00"
    assert d.reap() == [(head, 0x01020304)]


def test_indices_wrap_at_2_16():
    q, d, ram = make(size=4, idx=0xFFFE)
    heads = [d.add([(BUF + k, 1, False)]) for k in range(3)]
    d.publish()
    assert ram.peek(AVAIL + 2, "H") == (1,)
    got = [q.pop() for _ in range(3)]
    assert [c.head for c in got] == heads and q.pop() is None
    for c in got:
        q.push(c.head, 7)
    assert q.used_idx == 1 and ram.peek(USED + 2, "H") == (1,)
    assert d.reap() == [(h, 7) for h in heads]
    # slot of used idx 0xFFFE is 2, 0xFFFF is 3, 0x0000 is 0
    assert ram.peek(USED + 4 + 8 * 3, "I")[0] == heads[1] and ram.peek(USED + 4, "I")[0] == heads[2]


def test_push_of_a_head_that_is_not_one_is_a_device_bug():
    q, _, _ = make()
    with pytest.raises(ValueError):
        q.push(8, 0)
    with pytest.raises(ValueError):
        q.push(0, 1 << 32)


def test_an_avail_idx_exactly_size_ahead_is_fine_one_more_breaks():
    q, d, ram = make(size=4)
    for k in range(4):
        d.add([(BUF, 1, False)])
    d.publish()
    assert all(isinstance(q.pop(), Chain) for _ in range(4))
    q2, _, ram2 = make(size=4)
    raw_avail(ram2, 4, 5, 0, 0, 0, 0)
    assert q2.pop() is E.AVAIL_IDX_JUMP
    q3, _, ram3 = make(size=4)
    raw_avail(ram3, 4, 0xFFFF)              # "behind" the last one is a jump too (mod 2**16)
    assert q3.pop() is E.AVAIL_IDX_JUMP


# -- bad chains ----------------------------------------------------------------------------------
def test_a_loop_is_a_chain_too_long_and_the_queue_stays_broken(caplog):
    q, d, ram = make(size=8)
    d.desc(0, BUF, 8, NEXT, 1)
    d.desc(1, BUF, 8, NEXT, 0)
    raw_avail(ram, 8, 1, 0)
    with caplog.at_level(logging.WARNING):
        assert q.pop() is E.CHAIN_TOO_LONG
    assert q.broken is E.CHAIN_TOO_LONG
    before = ram.accesses
    assert q.pop() is E.CHAIN_TOO_LONG                  # without looking at the ring again
    assert ram.accesses == before
    assert q.push(0, 0) is E.CHAIN_TOO_LONG and q.needs_interrupt() is False
    assert q.stats.errors[E.CHAIN_TOO_LONG] == 1
    # the same stats on a new queue (the device after a reset): counted again, logged once
    q2 = Virtqueue(ram, 8, DESC, AVAIL, USED, stats=q.stats)
    assert q2.pop() is E.CHAIN_TOO_LONG
    assert q.stats.errors[E.CHAIN_TOO_LONG] == 2
    assert len([r for r in caplog.records if "CHAIN_TOO_LONG" in r.getMessage() or
                "longer than the queue size" in r.getMessage()]) == 1


def test_a_self_loop_and_a_chain_of_size_plus_one():
    q, d, ram = make(size=4)
    d.desc(2, BUF, 8, NEXT, 2)
    raw_avail(ram, 4, 1, 2)
    assert q.pop() is E.CHAIN_TOO_LONG
    q, d, ram = make(size=4)
    for i in range(4):
        d.desc(i, BUF, 1, NEXT if i < 3 else 0, i + 1)       # 4 descriptors: the limit
    raw_avail(ram, 4, 1, 0)
    assert len(q.pop().buffers) == 4
    q = Virtqueue(ram, 4, DESC, AVAIL, USED, max_descriptors=3)   # a device's smaller bound
    assert q.pop() is E.CHAIN_TOO_LONG


def test_next_and_head_out_of_range():
    q, d, ram = make(size=8)
    d.desc(0, BUF, 8, NEXT, 8)
    raw_avail(ram, 8, 1, 0)
    assert q.pop() is E.NEXT_OUT_OF_RANGE
    q, d, ram = make(size=8)
    raw_avail(ram, 8, 1, 8)
    assert q.pop() is E.HEAD_OUT_OF_RANGE


def test_next_is_ignored_without_the_next_flag():
    q, d, ram = make(size=8)
    d.desc(0, BUF, 8, 0, 0xFFFF)
    raw_avail(ram, 8, 1, 0)
    assert q.pop() == Chain(0, [(BUF, 8, False)], 8, 0)


def test_readable_after_writable_is_refused_even_with_zero_lengths():
    q, d, ram = make()
    d.desc(0, BUF, 0, NEXT | WRITE, 1)
    d.desc(1, BUF, 8, 0)
    raw_avail(ram, 8, 1, 0)
    assert q.pop() is E.READABLE_AFTER_WRITABLE


def test_chain_bytes_are_bounded():
    q, d, ram = make()
    d.desc(0, BUF, 0xFFFF_FFFF, NEXT, 1)
    d.desc(1, BUF, 1, WRITE)
    raw_avail(ram, 8, 1, 0)
    assert q.pop() == Chain(0, [(BUF, 0xFFFF_FFFF, False), (BUF, 1, True)], 0xFFFF_FFFF, 1)  # 2**32: allowed
    q, d, ram = make()
    d.desc(0, BUF, 0xFFFF_FFFF, NEXT, 1)
    d.desc(1, BUF, 2, WRITE)
    raw_avail(ram, 8, 1, 0)
    assert q.pop() is E.CHAIN_TOO_BIG
    q, d, ram = make(max_chain_bytes=4096)
    d.desc(0, BUF, 4097, 0)
    raw_avail(ram, 8, 1, 0)
    assert q.pop() is E.CHAIN_TOO_BIG


# -- indirect descriptors --------------------------------------------------------------------------
def test_an_indirect_chain_and_its_ignored_write_flag():
    q, d, ram = make(indirect_desc=True)
    bufs = [(BUF, 10, False), (BUF + 64, 20, True), (BUF + 128, 30, True)]
    head = d.add(bufs, indirect=True)
    d.desc(head, TABLES, 48, INDIRECT | WRITE)              # 2.7.5.3.2: WRITE here is ignored
    d.publish()
    assert q.pop() == Chain(head, bufs, 10, 50)


def test_direct_descriptors_followed_by_an_indirect_one():
    q, d, ram = make(indirect_desc=True)
    d.desc(0, BUF, 4, NEXT, 5)
    d.desc(5, TABLES, 32, INDIRECT)
    d.desc(0, BUF + 8, 8, NEXT, 1, table=TABLES)
    d.desc(1, BUF + 16, 16, WRITE, 0, table=TABLES)
    raw_avail(ram, 8, 1, 0)
    assert q.pop() == Chain(0, [(BUF, 4, False), (BUF + 8, 8, False), (BUF + 16, 16, True)], 12, 16)


@pytest.mark.parametrize("flags, length, negotiated, reason", [
    (INDIRECT, 32, False, E.INDIRECT_NOT_NEGOTIATED),
    (INDIRECT | NEXT, 32, True, E.INDIRECT_WITH_NEXT),
    (INDIRECT, 0, True, E.INDIRECT_BAD_LENGTH),
    (INDIRECT, 24, True, E.INDIRECT_BAD_LENGTH),
    (INDIRECT, 8, True, E.INDIRECT_BAD_LENGTH),
    (INDIRECT, 16 * 8 + 16, True, E.INDIRECT_TOO_LARGE),
    (INDIRECT, 0xFFFF_FFF0, True, E.INDIRECT_TOO_LARGE),
])
def test_bad_indirect_descriptors(flags, length, negotiated, reason):
    q, d, ram = make(size=8, indirect_desc=negotiated)
    for k in range(length // 16 if length < 4096 else 0):
        d.desc(k, BUF, 1, 0, table=TABLES)
    d.desc(0, TABLES, length, flags, 1)
    d.desc(1, BUF, 1, 0)
    raw_avail(ram, 8, 1, 0)
    before = ram.accesses
    assert q.pop() is reason
    assert ram.accesses - before <= 3               # idx, ring entry, the descriptor: no table read


def test_an_indirect_table_of_exactly_the_queue_size_is_fine_after_a_prefix_it_is_not():
    q, d, ram = make(size=8, indirect_desc=True)
    head = d.add([(BUF + k, 1, False) for k in range(8)], indirect=True)
    d.publish()
    assert len(q.pop().buffers) == 8
    q, d, ram = make(size=8, indirect_desc=True)
    d.desc(0, BUF, 1, NEXT, 1)
    d.desc(1, TABLES, 128, INDIRECT)
    raw_avail(ram, 8, 1, 0)
    assert q.pop() is E.INDIRECT_TOO_LARGE                 # 1 + 8 buffers


def test_nested_indirect_loop_and_next_inside_a_table():
    for entry, reason in [((TABLES, 16, INDIRECT, 0), E.NESTED_INDIRECT),
                          ((BUF, 1, NEXT, 0), E.CHAIN_TOO_LONG),          # entry 0 -> entry 0
                          ((BUF, 1, NEXT, 2), E.NEXT_OUT_OF_RANGE)]:      # a table of 2 entries
        q, d, ram = make(size=8, indirect_desc=True)
        d.desc(0, TABLES, 32, INDIRECT)
        d.desc(0, *entry, table=TABLES)
        raw_avail(ram, 8, 1, 0)
        assert q.pop() is reason, entry


# -- outside guest RAM -----------------------------------------------------------------------------
def test_parts_outside_ram_break_the_queue_without_raising():
    ram = FakeRam()
    assert Virtqueue(ram, 8, BASE + RAM_SIZE, AVAIL, USED).pop() is None      # nothing available yet
    q = Virtqueue(ram, 8, BASE + RAM_SIZE, AVAIL, USED)
    raw_avail(ram, 8, 1, 0)
    assert q.pop() is E.OUTSIDE_RAM                            # the descriptor table
    assert Virtqueue(ram, 8, DESC, BASE + RAM_SIZE - 2, USED).pop() is E.OUTSIDE_RAM   # avail ring
    q = Virtqueue(ram, 8, DESC, AVAIL, 0x1000)
    assert q.push(0, 1) is E.OUTSIDE_RAM and q.used_idx == 0   # the used ring
    q, d, ram = make(indirect_desc=True)
    d.desc(0, BASE + RAM_SIZE - 16, 32, INDIRECT)             # a table that ends outside RAM
    raw_avail(ram, 8, 1, 0)
    assert q.pop() is E.OUTSIDE_RAM
    assert "not backed by guest RAM" in q.broken_detail


def test_buffer_addresses_are_not_the_queue_s_business():
    q, d, ram = make()
    head = d.add([(0xFFFF_FFFF_FFFF_F000, 0x2000, True)])      # wraps past 2**64: the device's read fails
    d.publish()
    assert q.pop() == Chain(head, [(0xFFFF_FFFF_FFFF_F000, 0x2000, True)], 0, 0x2000)


# -- used buffer notifications (2.7.7) -------------------------------------------------------------
def test_needs_interrupt_follows_no_interrupt_without_event_idx():
    q, d, ram = make()
    assert q.needs_interrupt() is False                       # nothing pushed
    q.push(0, 0)
    assert q.needs_interrupt() is True
    assert q.needs_interrupt() is False                       # nothing new
    ram.poke(AVAIL, "H", V.VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.push(1, 0)
    assert q.needs_interrupt() is False
    ram.poke(AVAIL + 8 + 2 * 8 - 4, "H", 0)                   # used_event means nothing here
    ram.poke(AVAIL, "H", 0)
    q.push(2, 0)
    assert q.needs_interrupt() is True


def test_needs_interrupt_with_event_idx_is_vring_need_event():
    q, d, ram = make(event_idx=True)
    used_event = AVAIL + 4 + 2 * 8
    ram.poke(AVAIL, "H", V.VIRTQ_AVAIL_F_NO_INTERRUPT)         # ignored with EVENT_IDX
    ram.poke(used_event, "H", 2)                               # "interrupt me after entry 2"
    q.push(0, 0)
    assert q.needs_interrupt() is False                        # idx 1
    q.push(1, 0)
    assert q.needs_interrupt() is False                        # idx 2
    q.push(2, 0)
    assert q.needs_interrupt() is True                         # idx 3: entry 2 is used
    q.push(3, 0)
    assert q.needs_interrupt() is False                        # used_event is behind now
    ram.poke(used_event, "H", 4)
    q.push(4, 0)
    q.push(5, 0)                                               # 4 -> 6 in one go covers 4
    assert q.needs_interrupt() is True


def test_vring_need_event_wraps():
    assert V.vring_need_event(0xFFFF, 0, 0xFFFF)
    assert not V.vring_need_event(0xFFFF, 0xFFFF, 0xFFFE)
    assert V.vring_need_event(0xFFFE, 1, 0xFFFD)
    assert not V.vring_need_event(5, 5, 5)


# -- available buffer notifications (2.7.10) -------------------------------------------------------
def test_notifications_through_used_flags_without_event_idx():
    q, d, ram = make()
    assert q.disable_notifications() is None
    assert ram.peek(USED, "H") == (V.VIRTQ_USED_F_NO_NOTIFY,) and not q.notifications_enabled
    assert q.enable_notifications() is False
    assert ram.peek(USED, "H") == (0,)
    q.disable_notifications()
    d.add([(BUF, 1, False)])
    d.publish()                                                # the driver does not notify
    assert q.enable_notifications() is True                    # so the device must look
    assert isinstance(q.pop(), Chain)
    assert q.enable_notifications() is False


def test_notifications_through_avail_event_with_event_idx():
    q, d, ram = make(event_idx=True)
    avail_event = USED + 4 + 8 * 8
    ram.poke(avail_event, "H", 0x1234)
    q.disable_notifications()
    assert ram.peek(USED, "H") == (0,)                         # flags stay 0 (2.7.10.2)
    assert ram.peek(avail_event, "H") == (0x1234,)
    d.add([(BUF, 1, False)])
    d.publish()
    assert isinstance(q.pop(), Chain)
    assert ram.peek(avail_event, "H") == (0x1234,)             # disabled: not moved
    assert q.enable_notifications() is False
    assert ram.peek(avail_event, "H") == (1,)
    d.add([(BUF, 1, False)])
    d.publish()
    assert isinstance(q.pop(), Chain)
    assert ram.peek(avail_event, "H") == (2,)                  # enabled: follows the pops
    # the driver's rule for the next buffer: notify, as avail_event (2) is crossed
    assert V.vring_need_event(2, 3, 2)


# -- properties --------------------------------------------------------------------------------
buffer_lists = st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 20)), min_size=1, max_size=6)


@st.composite
def chains(draw):
    bufs = draw(buffer_lists)
    n_read = draw(st.integers(0, len(bufs)))
    return [(BUF + a, n, k >= n_read) for k, (a, n) in enumerate(bufs)], draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size_log=st.integers(3, 6), start=st.integers(0, 0xFFFF), event_idx=st.booleans(),
       rounds=st.lists(st.lists(chains(), min_size=1, max_size=8), min_size=1, max_size=6),
       seed=st.integers(0, 1 << 16))
def test_property_valid_chains_come_out_as_the_driver_put_them(size_log, start, event_idx, rounds, seed):
    size = 1 << size_log
    ram = FakeRam()
    rng = random.Random(seed)
    d = Driver(ram, size, idx=start, rng=rng)
    q = Virtqueue(ram, size, DESC, AVAIL, USED, event_idx=event_idx, indirect_desc=True,
                  last_avail_idx=start, used_idx=start)
    pushed = 0
    for batch in rounds:
        expect = []
        for bufs, indirect in batch:
            if len(d.free) < (1 if indirect else len(bufs)):
                break
            expect.append((d.add(bufs, indirect), bufs))
        d.next_table = TABLES + 0x1000 * (pushed % 4)           # tables of earlier rounds are free
        d.publish()
        got = []
        while (c := q.pop()) is not None:
            assert isinstance(c, Chain), c
            got.append(c)
        assert [(c.head, c.buffers) for c in got] == expect
        for c in got:
            assert c.readable == sum(n for _, n, w in c.buffers if not w)
            assert c.writable == sum(n for _, n, w in c.buffers if w)
        rng.shuffle(got)                                        # completion in any order
        written = [(c.head, rng.randrange(c.writable + 1)) for c in got]
        for head, n in written:
            assert q.push(head, n) is None
        pushed += len(got)
        assert q.used_idx == (start + pushed) & 0xFFFF == ram.peek(USED + 2, "H")[0]
        assert d.reap() == written
    assert sorted(d.free) == list(range(size))
    assert q.broken is None


def reference_pop(ram: FakeRam, size: int, last: int, indirect_ok: bool):
    """What pop() must return, from the spec's rules, without a table cursor: each step reads
    its descriptor from where the path so far says it is."""
    def u16(gpa):
        return struct.unpack("<H", ram.read(gpa, 2))[0]

    try:
        idx = u16(AVAIL + 2)
        if (idx - last) & 0xFFFF > size:
            return E.AVAIL_IDX_JUMP
        if idx == last:
            return None
        head = u16(AVAIL + 4 + 2 * (last % size))
        if head >= size:
            return E.HEAD_OUT_OF_RANGE
        out, base, bound, i, in_table = [], DESC, size, head, False
        for _ in range(2 * size + 2):
            addr, n, flags, nxt = struct.unpack("<QIHH", ram.read(base + 16 * i, 16))
            if flags & INDIRECT:
                if in_table:
                    return E.NESTED_INDIRECT
                if not indirect_ok:
                    return E.INDIRECT_NOT_NEGOTIATED
                if flags & NEXT:
                    return E.INDIRECT_WITH_NEXT
                if n == 0 or n % 16:
                    return E.INDIRECT_BAD_LENGTH
                if len(out) + n // 16 > size:
                    return E.INDIRECT_TOO_LARGE
                ram.read(addr, n)                                # the table must be in RAM
                base, bound, i, in_table = addr, n // 16, 0, True
                continue
            if len(out) == size:
                return E.CHAIN_TOO_LONG
            w = bool(flags & WRITE)
            if out and out[-1][2] and not w:
                return E.READABLE_AFTER_WRITABLE
            out.append((addr, n, w))
            if sum(b[1] for b in out) > 1 << 32:
                return E.CHAIN_TOO_BIG
            if not flags & NEXT:
                return Chain(head, out, 0, 0)
            if nxt >= bound:
                return E.NEXT_OUT_OF_RANGE
            i = nxt
        raise AssertionError("the reference itself must end")
    except GuestMemoryError:
        return E.OUTSIDE_RAM


def descriptors(n: int):
    """Descriptor fields biased towards the interesting: table and RAM-edge addresses, table
    lengths, each flag combination, next indices around `n` (the entries of a table)."""
    return st.tuples(
        st.sampled_from([TABLES, TABLES + 0x40, BUF, BASE + RAM_SIZE - 16]) | st.integers(0, (1 << 64) - 1),
        st.sampled_from([0, 1, 16, 24, 32, 48, 64, 0xFFFF_FFFF]) | st.integers(0, (1 << 32) - 1),
        st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE])
        | st.integers(0, 0xFFFF),
        st.integers(0, n) | st.integers(0, 0xFFFF))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size_log=st.integers(0, 4), indirect_ok=st.booleans(), event_idx=st.booleans(),
       data=st.data())
def test_property_garbage_never_raises_never_loops_and_matches_the_rules(size_log, indirect_ok, event_idx, data):
    n = 1 << size_log
    table = data.draw(st.lists(descriptors(n - 1), min_size=16, max_size=16))
    tables = data.draw(st.lists(descriptors(3), min_size=32, max_size=32))
    wild = data.draw(st.integers(0, 7)) == 0            # now and then, any 16-bit values
    ring = data.draw(st.lists(st.integers(0, 0xFFFF if wild else n - 1), min_size=16, max_size=16))
    avail_idx = data.draw(st.integers(0, 0xFFFF if wild else n))
    size = 1 << size_log
    ram = FakeRam()
    for k, desc in enumerate(table):
        ram.poke(DESC + 16 * k, "QIHH", *desc)
    for k, desc in enumerate(tables):
        ram.poke(TABLES + 16 * k, "QIHH", *desc)
    for k, h in enumerate(ring):
        ram.poke(AVAIL + 4 + 2 * k, "H", h)
    ram.poke(AVAIL + 2, "H", avail_idx)
    q = Virtqueue(ram, size, DESC, AVAIL, USED, indirect_desc=indirect_ok, event_idx=event_idx)
    ref = FakeRam()
    ref.buf = ram.buf
    for _ in range(size + 2):
        last = q.last_avail_idx
        expect = reference_pop(ref, size, last, indirect_ok)
        before = ram.accesses
        got = q.pop()
        assert ram.accesses - before <= size + 4               # bounded work per pop
        assert got == expect
        event("chain" if isinstance(got, Chain) else str(got))
        if isinstance(got, Chain):
            assert len(got.buffers) <= size and got.readable + got.writable <= 1 << 32
            assert q.push(got.head, 0) is None
            q.needs_interrupt()
        elif got is None:
            assert q.last_avail_idx == avail_idx
            break
        else:
            assert q.broken is got and q.pop() is got and q.stats.errors[got] == 1
            break
