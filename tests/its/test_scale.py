"""The ITS model at the architecture's limits, on the host: every DeviceID of a two-level device
table, a device with 2^16 events, the largest command queue, and the work of one command with
many ITEs. Each at the smallest size that shows the mechanism, the limits themselves where the
architecture sets them. (How the costs grow with the work is part 6 of `kvmits bench`:
kvmits/bench/scale_model.py.)"""

from __future__ import annotations

from kvmits.its import MISS_DEVICE_UNMAPPED, MISS_EVENT_OUT_OF_RANGE, MISS_NO_ITE, TRANSLATED, ItsConfig
from kvmits.its import abi
from kvmits.its import commands as C
from kvmits.its import registers as R
from tests.its.ramfake import DEVICE_TABLE, ITTS, L2_PAGES, QUEUE, RAM_BASE, Harness, itt

#: GITS_CBASER.Size = 255: the largest queue, 256 4 KiB pages
MAX_QUEUE_PAGES = R.GITS_CBASER_SIZE_MASK + 1
#: where a 1 MiB queue fits in ramfake's RAM, clear of its tables and ITTs (64 KiB aligned)
BIG_QUEUE = RAM_BASE + 0x40_0000
#: 2^16 events x 8-byte ITEs: an ITT of 512 KiB from ITTS, so the next ITT goes after it
AFTER_BIG_ITT = ITTS + (1 << 16) * abi.ABI_REV0_ENTRY_SIZE


def field(value: int, shift: int, width: int) -> int:
    return (value >> shift) & ((1 << width) - 1)


def submit(h: Harness, commands: list[bytes]) -> list[int]:
    """Publish `commands` with one GITS_CWRITER write, then poll GITS_CREADR as a driver waits
    for completion (each read runs up to a budget); the error codes of what ran."""
    start = len(h.records)
    h.enqueue(*commands)
    for _ in range(len(commands) // h.its.config.command_budget + 1):
        if h.its.mmio_read(R.GITS_CREADR, 8) == h.its.cwriter:
            break
    assert h.its.creadr == h.its.cwriter and not h.its.stalled
    return [r.error for r in h.records[start:] if r.error]


# -- 2^16 DeviceIDs through a two-level device table ----------------------------------------------
def test_every_device_id_is_reachable_through_a_two_level_device_table():
    h = Harness(enable=False)
    h.setup(indirect=True)
    its, ram = h.its, h.ram
    dt = R.decode_baser(its.mmio_read(R.GITS_BASER0, 8))
    devbits = field(its.mmio_read(R.GITS_TYPER, 8), R.GITS_TYPER_DEVBITS_SHIFT, 5) + 1
    per_page = dt.page_size // dt.entry_size
    # IHI 0069, GITS_BASER<n>.Indirect = 1: each level-1 entry points to one page of DTEs; 64 KiB
    # pages of 8-byte entries hold 8192 DeviceIDs, so 16 DeviceID bits need 8 level-1 entries
    assert (dt.indirect, dt.page_size, dt.entry_size, devbits, per_page) == (True, 65536, 8, 16, 8192)
    l1_entries = (1 << devbits) // per_page
    assert l1_entries == 8
    missing = 5                                 # its level-2 page is not allocated yet
    for n in range(l1_entries):
        ram.poke_u64(DEVICE_TABLE + n * abi.L1_ENTRY_SIZE,
                     abi.encode_l1_entry(L2_PAGES + n * dt.page_size, valid=n != missing))
    # from every level-2 page: its first DeviceID, one inside, its last (0 and 0xFFFF among them)
    sample = [n * per_page + k for n in range(l1_entries) for k in (0, 1000 + 777 * n, per_page - 1)]
    assert sample[0] == 0 and sample[-1] == 0xFFFF
    assert submit(h, [C.encode_mapc(0, 1)]) == []
    ram.accesses.clear()

    def map_sample(devids):
        cmds = []
        for devid in devids:
            i = sample.index(devid)
            cmds += [C.encode_mapd(devid, itt(i), 1), C.encode_mapti(devid, 1, R.LPI_BASE + i, 0)]
        return submit(h, cmds)

    lost = [d for d in sample if d // per_page == missing]
    # a DeviceID whose level-1 entry is not Valid has no DTE: MAPD fails with
    # E_ITS_MAPD_DEVICE_OOR (KVM: vgic_its_check_id() finds no entry), so MAPTI finds no device
    assert map_sample(sample) == [C.E_ITS_MAPD_DEVICE_OOR, C.E_ITS_MAPTI_UNMAPPED_DEVICE] * len(lost)
    assert its.error_counts == {C.E_ITS_MAPD_DEVICE_OOR: len(lost), C.E_ITS_MAPTI_UNMAPPED_DEVICE: len(lost)}
    h.sink.clear()
    delivered = [its.signal_msi(d, 1) for d in sample]
    assert delivered == [d not in lost for d in sample]
    assert h.sink.of("set_pending") == [(R.LPI_BASE + i, 1) for i, d in enumerate(sample) if d not in lost]
    assert its.miss_counts[MISS_DEVICE_UNMAPPED] == len(lost)
    # DeviceID 2^16 is beyond GITS_TYPER.Devbits: refused before any table is read
    reads = len(ram.accesses)
    assert submit(h, [C.encode_mapd(1 << devbits, itt(99), 1)]) == [C.E_ITS_MAPD_DEVICE_OOR]
    assert [a[:3] for a in ram.accesses[reads:]] == [("read", QUEUE + its.creadr - R.ITS_CMD_SIZE, R.ITS_CMD_SIZE)]
    # the driver allocates the missing level-2 page (Linux its_alloc_device_table on demand):
    # the level-1 entry is read at MAPD time, and those DeviceIDs map and translate now
    ram.poke_u64(DEVICE_TABLE + missing * abi.L1_ENTRY_SIZE,
                 abi.encode_l1_entry(L2_PAGES + missing * dt.page_size))
    assert map_sample(lost) == []
    assert sorted(its.dump()["devices"]) == sample
    assert all(its.translate(d, 1).ok for d in sample)
    # every access was inside guest RAM, and inside the queue, the 8 level-1 entries (the
    # rest of the level-1 page is never read) or the level-2 pages; nothing was written
    regions = [(QUEUE, h.queue_size), (DEVICE_TABLE, l1_entries * abi.L1_ENTRY_SIZE),
               (L2_PAGES, l1_entries * dt.page_size)]
    assert ram.accesses and all(a[3] for a in ram.accesses)
    assert all(any(base <= gpa and gpa + size <= base + length for base, length in regions)
               for kind, gpa, size, _ in ram.accesses), ram.accesses
    assert ram.writes() == []


# -- a device with 2^16 events ----------------------------------------------------------------------
def test_a_device_with_2_16_events():
    events = 1 << 16
    h = Harness(ItsConfig(max_ites=events, log_limit=0), queue_pages=MAX_QUEUE_PAGES, queue_base=BIG_QUEUE)
    its = h.its
    idbits = field(its.mmio_read(R.GITS_TYPER, 8), R.GITS_TYPER_IDBITS_SHIFT, 5) + 1
    assert idbits == 16
    mapd = C.encode_mapd(1, ITTS, idbits)
    assert field(C.COMMAND.unpack(mapd)[1], C.SIZE.lsb, C.SIZE.width) == 15    # MAPD Size = 15
    # LPI INTIDs run from 8192 to the redistributors' bound (2^16, GICR_PROPBASER.IDbits as
    # KVM's): 57344 of them, shared round-robin by the 65536 events
    lpis = h.lpi_limit - R.LPI_BASE

    def ite(e):
        return R.LPI_BASE + e % lpis, e % 4

    assert submit(h, [mapd] + [C.encode_mapc(c, c) for c in range(4)]) == []
    chunk = 16384                               # a quarter of the events per CWRITER write
    for start in range(0, events, chunk):
        assert submit(h, [C.encode_mapti(1, e, *ite(e)) for e in range(start, start + chunk)]) == []
    assert its.ite_count == events
    for e in range(events):
        intid, icid = ite(e)
        assert its.translate(1, e) == (intid, icid, icid, TRANSLATED)
    # two ITEs for each of the first 8192 LPIs, one for the others: the sink's refs say so
    assert h.sink.refs == {R.LPI_BASE + k: 2 if k < events - lpis else 1 for k in range(lpis)}
    h.sink.clear()
    assert its.signal_msi(1, 0) and its.signal_msi(1, lpis) and its.signal_msi(1, events - 1)
    assert h.sink.of("set_pending") == [(R.LPI_BASE, 0), (R.LPI_BASE, lpis % 4), (ite(events - 1)[0], 3)]
    # EventID 2^16 is beyond 16 EventID bits, and so is a MAPD of 17
    assert submit(h, [C.encode_mapti(1, events, R.LPI_BASE, 0), C.encode_int(1, events),
                      C.encode_mapd(2, AFTER_BIG_ITT, idbits + 1)]) == [
        C.E_ITS_MAPTI_ID_OOR, C.E_ITS_INT_ID_OOR, C.E_ITS_MAPD_ITTSIZE_OOR]
    assert its.translate(1, events).reason == MISS_EVENT_OUT_OF_RANGE
    assert not its.signal_msi(1, events)
    # the model's memory is bounded by ItsConfig.max_ites (KVM: kzalloc of an ITE fails): one
    # more MAPTI, on another device, fails and is counted, and a DISCARD makes room for it
    errors_before = dict(its.error_counts)
    assert submit(h, [C.encode_mapd(2, AFTER_BIG_ITT, 1), C.encode_mapti(2, 0, R.LPI_BASE, 0)]) == [
        C.E_ITS_OUT_OF_RESOURCES]
    assert its.error_counts[C.E_ITS_OUT_OF_RESOURCES] == errors_before.get(C.E_ITS_OUT_OF_RESOURCES, 0) + 1
    assert its.ite_count == events and its.translate(2, 0).reason == MISS_NO_ITE
    assert submit(h, [C.encode_discard(1, 0), C.encode_mapti(2, 0, R.LPI_BASE, 0)]) == []
    assert its.ite_count == events and its.translate(2, 0).ok and not its.translate(1, 0).ok


# -- the largest command queue --------------------------------------------------------------------
def test_the_largest_queue_runs_32767_commands_in_budget_chunks_and_wraps_in_order():
    h = Harness(queue_pages=MAX_QUEUE_PAGES, queue_base=BIG_QUEUE)
    its = h.its
    cbaser = its.mmio_read(R.GITS_CBASER, 8)
    slots = R.cbaser_queue(cbaser)[1] // R.ITS_CMD_SIZE
    assert cbaser & R.GITS_CBASER_SIZE_MASK == 255 and slots == 32768
    budget = its.config.command_budget

    def mapcs(count, first=0):
        """MAPCs whose outcome depends on their order: ICID i % 61 ends on the last one's target."""
        return [C.encode_mapc(i % 61, (i // 61) % 4) for i in range(first, first + count)]

    def final(count, first=0):
        out = {}
        for i in range(first, first + count):
            out[i % 61] = (i // 61) % 4
        return out

    # IHI 0069, the command queue: it is full when GITS_CWRITER is one command behind
    # GITS_CREADR, so at most 32767 commands are outstanding; here all by one GITS_CWRITER write
    full = slots - 1
    h.enqueue(*mapcs(full))
    assert its.cwriter == full * R.ITS_CMD_SIZE == R.GITS_CMD_OFFSET_MASK
    # the write ran one budget (config.command_budget), a second write of the same value the next
    assert its.creadr == budget * R.ITS_CMD_SIZE and its.pending_commands == full - budget
    its.mmio_write(R.GITS_CWRITER, 8, its.cwriter)
    assert its.creadr == 2 * budget * R.ITS_CMD_SIZE
    # each GITS_CREADR read (a driver polling) runs the next budget: GITS_CREADR only moves
    # forward, always to the end of what was processed, and ends equal to GITS_CWRITER
    reads = []
    while not reads or reads[-1] != its.cwriter:
        reads.append(its.mmio_read(R.GITS_CREADR, 8))
        assert reads[-1] == its.commands_processed * R.ITS_CMD_SIZE == len(h.records) * R.ITS_CMD_SIZE
        assert len(reads) <= full // budget
    assert reads == [min(k * budget, full) * R.ITS_CMD_SIZE for k in range(3, -(-full // budget) + 1)]
    assert [r.offset for r in h.records] == [i * R.ITS_CMD_SIZE for i in range(full)]
    assert not any(r.error for r in h.records) and its.dump()["collections"] == final(full)

    # a batch across the end of the queue: its first command in the last slot, the rest from
    # slot 0, processed in order (each needs the one before it)
    h.records.clear()
    batch = [C.encode_mapd(1, itt(1), 2), C.encode_mapc(100, 1), C.encode_mapti(1, 0, R.LPI_BASE, 100),
             C.encode_int(1, 0), C.encode_mapc(101, 3), C.encode_movi(1, 0, 101), C.encode_int(1, 0)]
    h.sink.clear()
    assert submit(h, batch) == []
    assert [r.offset for r in h.records] == [full * R.ITS_CMD_SIZE] + [
        i * R.ITS_CMD_SIZE for i in range(len(batch) - 1)]
    assert h.sink.of("set_pending") == [(R.LPI_BASE, 1), (R.LPI_BASE, 3)]
    # and 32767 more from there: across the end again, in budget chunks, in order
    h.records.clear()
    start = its.creadr // R.ITS_CMD_SIZE
    assert submit(h, mapcs(full, first=7)) == []
    assert [r.offset for r in h.records] == [(start + i) % slots * R.ITS_CMD_SIZE for i in range(full)]
    assert {i: its.dump()["collections"][i] for i in range(61)} == final(full, first=7)


def test_publishing_a_whole_queue_of_commands_publishes_none():
    """32768 commands would bring GITS_CWRITER back to GITS_CREADR: an empty queue."""
    h = Harness(queue_pages=MAX_QUEUE_PAGES, queue_base=BIG_QUEUE)
    h.enqueue(*[C.encode_mapc(0, 1)] * (h.queue_size // R.ITS_CMD_SIZE))
    assert h.its.cwriter == h.its.creadr == 0 and h.its.pending_commands == 0
    assert h.its.commands_processed == 0 and h.its.dump()["collections"] == {}


# -- the work of one command with many ITEs --------------------------------------------------------
def test_commands_tell_the_sink_once_per_ite_they_concern():
    """With 2^16 ITEs (64 devices of 1024 events, ICID e % 4 on vCPU e % 4, LPIs shared
    round-robin, as the bench maps them): a MAPC re-target re-applies its collection's target to
    the LPI of each of its ITEs (KVM's update_affinity_collection), once per ITE, in a stable
    order, and to no other ITE; MOVALL is one call whatever the ITEs; MAPD of a mapped device
    frees its ITEs and no others."""
    h = Harness(ItsConfig(log_limit=0), queue_pages=MAX_QUEUE_PAGES, queue_base=BIG_QUEUE)
    lpis = h.lpi_limit - R.LPI_BASE
    bits = 10
    itt_bytes = (1 << bits) * abi.ABI_REV0_ENTRY_SIZE

    def intid(d, e):
        return R.LPI_BASE + (d << bits | e) % lpis

    cmds = [C.encode_mapc(c, c) for c in range(4)]
    for d in range(64):
        cmds.append(C.encode_mapd(d, ITTS + d * itt_bytes, bits))
        cmds += [C.encode_mapti(d, e, intid(d, e), e % 4) for e in range(1 << bits)]
        if len(cmds) > 16384:
            assert submit(h, cmds) == []
            cmds = []
    assert submit(h, cmds) == [] and h.its.ite_count == 1 << 16
    h.sink.clear()
    assert submit(h, [C.encode_mapc(1, 2)]) == []
    # each ITE of the collection once (in the index's order, not sorted: ItsModel._members)
    assert sorted(h.sink.calls) == sorted(("move", intid(d, e), 1, 2) for d in range(64)
                                          for e in range(1, 1 << bits, 4))
    h.sink.clear()
    assert submit(h, [C.encode_movall(0, 3), C.encode_movi(5, 7, 1), C.encode_int(5, 7)]) == []
    assert h.sink.calls == [("move_all", 0, 3), ("move", intid(5, 7), 3, 2), ("set_pending", intid(5, 7), 2)]
    h.sink.clear()
    assert submit(h, [C.encode_mapd(9, ITTS + 9 * itt_bytes, bits)]) == []
    assert h.sink.calls == [("unmapped", intid(9, e), e % 4 if e % 4 != 1 else 2) for e in range(1 << bits)]
    assert h.its.ite_count == (1 << 16) - (1 << bits)


def test_ites_walked_by_mapc_and_mapd_count_against_the_command_budget():
    """One GITS_CWRITER write does bounded work whatever a collection holds: a MAPC moving 256
    ITEs uses up a budget of 64 on its own, and the commands after it wait for the next call."""
    h = Harness(ItsConfig(command_budget=64), queue_pages=4)
    its = h.its
    h.run(C.encode_mapc(0, 0))
    h.run(C.encode_mapd(1, itt(0), 8))
    for first in range(0, 256, 32):                      # 32 MAPTIs per write: within the budget
        assert h.run(*(C.encode_mapti(1, e, R.LPI_BASE + e, 0) for e in range(first, first + 32))) == []
    assert its.ite_count == 256 and its.creadr == its.cwriter
    start = its.creadr
    h.sink.clear()
    h.enqueue(C.encode_mapc(0, 1), C.encode_sync(0), C.encode_sync(1))
    assert its.creadr == start + 32                      # the MAPC ran, alone
    assert len(h.sink.of("move")) == 256
    assert its.mmio_read(R.GITS_CREADR, 8) == start + 96   # a driver's poll runs the rest
    # a MAPD that frees the device's 256 ITEs: the same
    start = its.creadr
    h.enqueue(C.encode_mapd(1, itt(0), 8, valid=False), C.encode_sync(0))
    assert its.creadr == start + 32 and its.ite_count == 0
    assert its.mmio_read(R.GITS_CREADR, 8) == start + 64
    # commands that walk nothing: the whole budget per write, as before
    h.enqueue(*[C.encode_sync(0)] * 100)
    assert its.creadr == start + 64 + 64 * 32
