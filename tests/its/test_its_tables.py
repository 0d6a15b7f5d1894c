"""KVM ITS table ABI rev 0: entry layouts, hand-built tables, save/restore, page sizes."""

import pytest

from kvmits.its import ErrorPolicy, ItsConfig, ItsTableError, read_tables
from kvmits.its import abi
from kvmits.its import commands as C
from kvmits.its import registers as R
from tests.its.ramfake import (
    COLLECTION_TABLE, DEVICE_TABLE, L2_PAGES, RAM_BASE, RAM_SIZE, FakeRam, Harness, itt,
)

V = 1 << 63


# -- entry layouts (Documentation/virt/kvm/devices/arm-vgic-its.rst) -------------------------
def test_dte_layout():
    assert abi.encode_dte(0x1234_5600, 5, 3) == V | (3 << 49) | (0x12_3456 << 5) | 4
    assert abi.decode_dte(V | (0x3FFF << 49) | (0xF_FFFF_FFFF_FFFF >> 8 << 5) | 31) == (
        True, 0x3FFF, 0xF_FFFF_FFFF_FF00, 32)
    assert abi.decode_dte(0).valid is False


def test_cte_layout():
    assert abi.encode_cte(0xABCD, 7) == V | (7 << 16) | 0xABCD
    assert abi.encode_cte(3, abi.COLLECTION_NOT_MAPPED) == V | (0xFFFF_FFFF << 16) | 3
    assert abi.decode_cte(V | (5 << 16) | 9) == (True, 5, 9)


def test_ite_layout():
    assert abi.encode_ite(8192, 0x11, 0xFFFF) == (0xFFFF << 48) | (8192 << 16) | 0x11
    assert abi.decode_ite((2 << 48) | (9000 << 16) | 4) == (2, 9000, 4)


# -- decoding hand-built tables ------------------------------------------------------------------
BASER0 = R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_DEVICE, base=DEVICE_TABLE, pages=1)
BASER1 = R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_COLLECTION, base=COLLECTION_TABLE,
                        pages=1)


def test_decode_hand_built_flat_tables():
    ram = FakeRam()
    big_dt = RAM_BASE + 0x40_0000                        # 4 pages: 32768 DTEs
    baser0 = R.encode_baser(valid=True, type_=1, base=big_dt, pages=4)
    # collections: ICID 2 -> vCPU 1, ICID 5 -> vCPU 0, ICID 9 without a target; then the end
    for n, raw in enumerate([V | (1 << 16) | 2, V | 5, V | (0xFFFF_FFFF << 16) | 9, 0,
                             V | (3 << 16) | 77]):
        ram.poke_u64(COLLECTION_TABLE + 8 * n, raw)
    # device 3: 4 EventID bits; the next device (20000) is further than 2^14-1: next is
    # capped, and the reader steps over invalid entries from 3 + 16383 on.
    ram.poke_u64(big_dt + 8 * 3, V | (16383 << 49) | ((itt(3) >> 8) << 5) | 3)
    ram.poke_u64(big_dt + 8 * 7, V | ((itt(7) >> 8) << 5) | 3)        # jumped over
    ram.poke_u64(big_dt + 8 * 20000, V | ((itt(8) >> 8) << 5) | 0)   # last: next = 0
    ram.poke_u64(big_dt + 8 * 20100, V | ((itt(9) >> 8) << 5) | 0)   # after the last
    # device 3's ITT: events 1 (next 2), 3 (next 0 = last), 5 (after the last: ignored)
    ram.poke_u64(itt(3) + 8 * 1, (2 << 48) | (8192 << 16) | 2)
    ram.poke_u64(itt(3) + 8 * 3, (9000 << 16) | 9)
    ram.poke_u64(itt(3) + 8 * 5, (9001 << 16) | 5)
    # device 20000's ITT (1 bit): event 1 only; event 0 invalid (pINTID 0, other bits set)
    ram.poke_u64(itt(8) + 0, 0xFFFF)
    ram.poke_u64(itt(8) + 8, (8300 << 16) | 5)
    content = read_tables(ram, baser0, BASER1, nr_vcpus=2)
    assert content.dump == {
        "collections": {2: 1, 5: 0},
        "devices": {
            3: {"events": {1: {"icid": 2, "intid": 8192}, 3: {"icid": 9, "intid": 9000}},
                "itt_addr": itt(3), "size_bits": 4},
            20000: {"events": {1: {"icid": 5, "intid": 8300}}, "itt_addr": itt(8),
                    "size_bits": 1},
        },
    }
    assert content.unmapped_collections == (9,)
    assert list(content.dump["devices"]) == [3, 20000]      # sorted keys
    # with a one-page table the capped jump leaves the table: the walk ends after device 3
    small = read_tables(ram, R.encode_baser(valid=True, type_=1, base=big_dt, pages=1), BASER1)
    assert list(small.dump["devices"]) == [3]


def test_decode_two_level_device_table():
    ram = FakeRam()
    baser0 = R.encode_baser(valid=True, type_=1, base=DEVICE_TABLE, pages=1, indirect=True)
    ram.poke_u64(DEVICE_TABLE + 8 * 2, V | L2_PAGES)                  # DeviceIDs 16384..
    ram.poke_u64(DEVICE_TABLE + 8 * 3, L2_PAGES + 0x10000)             # not Valid: skipped
    ram.poke_u64(L2_PAGES + 8 * 5, V | (10 << 49) | ((itt(0) >> 8) << 5) | 1)
    ram.poke_u64(L2_PAGES + 8 * 15, V | ((itt(1) >> 8) << 5) | 1)
    ram.poke_u64(L2_PAGES + 0x10000 + 8, V | ((itt(2) >> 8) << 5) | 1)
    ram.poke_u64(itt(0), (8192 << 16) | 1)
    ram.poke_u64(COLLECTION_TABLE, V | 1)
    dump = read_tables(ram, baser0, BASER1).dump
    assert sorted(dump["devices"]) == [16384 + 5, 16384 + 15]
    assert dump["devices"][16389]["events"] == {0: {"icid": 1, "intid": 8192}}


@pytest.mark.parametrize("mutate,message", [
    (lambda ram: ram.poke_u64(itt(1), (100 << 16) | 1), "< 8192"),
    (lambda ram: ram.poke_u64(itt(1), (4 << 48) | (8192 << 16) | 1), "EventID space"),
    (lambda ram: ram.poke_u64(itt(1), (8192 << 16) | 4), "not in the collection table"),
    (lambda ram: ram.poke_u64(COLLECTION_TABLE + 8, V | 1), "twice"),
    (lambda ram: ram.poke_u64(COLLECTION_TABLE, V | (2 << 16) | 1), "targets vCPU 2"),
    (lambda ram: ram.poke_u64(COLLECTION_TABLE, V | 9000), "beyond the collection table"),
])
def test_decode_refuses_what_the_kernel_refuses(mutate, message):
    ram = FakeRam()
    ram.poke_u64(COLLECTION_TABLE, V | 1)
    ram.poke_u64(DEVICE_TABLE + 8, V | ((itt(1) >> 8) << 5) | 1)      # 2 EventID bits
    ram.poke_u64(itt(1) + 8, (8200 << 16) | 1)
    read_tables(ram, BASER0, BASER1, nr_vcpus=2)                       # valid as built
    mutate(ram)
    with pytest.raises(ItsTableError, match=message):
        read_tables(ram, BASER0, BASER1, nr_vcpus=2)


def test_decode_is_bounded_and_stays_in_ram():
    ram = FakeRam()
    # 8192 devices of 16 EventID bits, all ITEs invalid: 2^29 entries to scan
    for d in range(8192):
        ram.poke_u64(DEVICE_TABLE + 8 * d, V | (1 << 49) | ((itt(0) >> 8) << 5) | 15)
    with pytest.raises(ItsTableError, match="budget"):
        read_tables(ram, BASER0, BASER1, max_entries=100_000)
    # an ITT beyond RAM
    ram2 = FakeRam()
    ram2.poke_u64(DEVICE_TABLE, V | (((RAM_BASE + RAM_SIZE) >> 8) << 5) | 1)
    with pytest.raises(ItsTableError, match="not in guest RAM"):
        read_tables(ram2, BASER0, BASER1)
    assert all(a[3] or a[0] == "read" for a in ram2.accesses)


def test_decode_ignores_tables_whose_baser_is_not_valid():
    ram = FakeRam()
    ram.poke_u64(COLLECTION_TABLE, V | 1)
    assert read_tables(ram, BASER0 & ~V, BASER1 & ~V).dump == {"collections": {}, "devices": {}}


# -- save (KVM_DEV_ARM_ITS_SAVE_TABLES) -----------------------------------------------------------
def _populated(config=None, **kw):
    h = Harness(config, nr_vcpus=4, **kw)
    assert h.run(
        C.encode_mapc(0, 1), C.encode_mapc(3, 2),
        C.encode_mapd(1, itt(1), 6), C.encode_mapd(200, itt(2), 2), C.encode_mapd(40000 % 8192, itt(3), 16),
        C.encode_mapti(1, 0, 8192, 0), C.encode_mapti(1, 63, 8193, 3), C.encode_mapti(1, 7, 8194, 0),
        C.encode_mapti(200, 3, 9000, 3), C.encode_mapti(40000 % 8192, 0xFFFF, 0xFFFF, 0),
        C.encode_mapti(40000 % 8192, 0, 8195, 6),      # collection 6 has no target
    ) == []
    return h


def test_save_writes_kernel_layout_and_reads_back_identically():
    h = _populated()
    written = h.its.save_tables()
    assert written == 8 * (3 + 6 + 4)                  # DTEs, ITEs, CTEs (incl. terminator)
    assert h.ram.peek_u64(DEVICE_TABLE + 8) == V | (199 << 49) | ((itt(1) >> 8) << 5) | 5
    assert h.ram.peek_u64(DEVICE_TABLE + 8 * 200) == V | (
        (40000 % 8192 - 200) << 49) | ((itt(2) >> 8) << 5) | 1
    assert h.ram.peek_u64(itt(1)) == (7 << 48) | (8192 << 16) | 0
    assert h.ram.peek_u64(itt(1) + 8 * 63) == (8193 << 16) | 3
    assert [h.ram.peek_u64(COLLECTION_TABLE + 8 * n) for n in range(4)] == [
        V | (1 << 16) | 0, V | (2 << 16) | 3, V | (0xFFFF_FFFF << 16) | 6, 0]
    content = read_tables(h.ram, h.its.mmio_read(R.GITS_BASER0, 8),
                          h.its.mmio_read(R.GITS_BASER0 + 8, 8), nr_vcpus=4)
    assert content.dump == h.its.dump()
    assert content.unmapped_collections == (6,)


def test_save_writes_only_inside_the_tables():
    h = _populated()
    h.ram.accesses.clear()
    h.its.save_tables()
    regions = [(DEVICE_TABLE, 0x10000), (COLLECTION_TABLE, 0x10000)]
    regions += [(d["itt_addr"], 8 << d["size_bits"]) for d in h.its.dump()["devices"].values()]
    assert h.ram.writes()
    for _, gpa, size, ok in h.ram.writes():
        assert ok and any(lo <= gpa and gpa + size <= lo + n for lo, n in regions)


def test_commands_never_write_guest_memory():
    h = _populated()
    assert h.ram.writes() == []


def test_restore_into_a_fresh_model():
    h = _populated()
    h.its.save_tables()
    fresh = Harness(nr_vcpus=4, ram=h.ram)
    fresh.its.restore_tables()
    assert fresh.its.dump() == h.its.dump()
    assert sorted(fresh.sink.of("mapped"), key=str) == sorted(h.its.ite_lpis(), key=str)
    assert (8195, None) in fresh.sink.of("mapped")      # the ITE of collection 6, without a target
    assert fresh.its.translate(200, 3)[:3] == (9000, 3, 2)
    # collection 6 is known without a target: mapping it revives its ITE
    assert fresh.run(C.encode_mapc(6, 3)) == []
    assert fresh.its.translate(40000 % 8192, 0)[:3] == (8195, 6, 3)


def test_restore_failure_changes_nothing():
    h = _populated()
    h.its.save_tables()
    h.ram.poke_u64(itt(1), (5 << 16))                   # pINTID 5: refused
    before = h.its.dump()
    with pytest.raises(ItsTableError):
        h.its.restore_tables()
    assert h.its.dump() == before


@pytest.mark.parametrize("devid, size_bits, message", [
    (16, 1, "DeviceID 0x10 is beyond the ITS's 4 DeviceID bits"),
    (3, 17, "17 EventID bits, the ITS has 16"),
])
def test_restore_refuses_what_mapd_refuses(devid, size_bits, message):
    """A DTE of a DeviceID beyond GITS_TYPER.Devbits, or with more EventID bits than ID_bits,
    is refused as MAPD refuses it (KVM's vgic_its_restore_dte: vgic_its_check_id, and the
    EventID bits check). Found by tools/fuzz model (tests/fuzz/crashers/restore-devbits): the
    model restored DeviceID 0x10 into an ITS of 4 DeviceID bits."""
    h = Harness(ItsConfig(devbits=4), nr_vcpus=1)
    h.ram.poke_u64(DEVICE_TABLE + 8 * devid, abi.encode_dte(itt(0), size_bits))
    with pytest.raises(ItsTableError, match=message):
        h.its.restore_tables()
    assert h.its.dump() == {"collections": {}, "devices": {}}
    # the same DTE inside both bounds is restored
    h.ram.poke_u64(DEVICE_TABLE + 8 * devid, 0)
    h.ram.poke_u64(DEVICE_TABLE + 8 * 3, abi.encode_dte(itt(0), 16))
    h.its.restore_tables()
    assert list(h.its.dump()["devices"]) == [3]


def test_orphaned_ites_are_saved_as_the_kernel_saves_them():
    """MAPC V=0 leaves the kernel's ITEs of that collection without one; its
    KVM_DEV_ARM_ITS_SAVE_TABLES (vgic_its_save_ite, seen on the testbed's Debian 6.1 kernel)
    writes an all-zero entry for them, which the previous ITE's `next` still points at, and
    no collection entry: after a restore they are gone."""
    h = _populated()
    assert h.run(C.encode_mapc(3, 0, valid=False)) == []
    assert h.its.orphaned_ites() == ((1, 63), (200, 3))
    h.ram.poke_u64(itt(1) + 8 * 63, 0xDEAD << 16)
    h.ram.poke_u64(itt(2) + 8 * 3, 0xDEAD << 16)
    h.its.save_tables()
    assert h.ram.peek_u64(itt(1) + 8 * 7) == (56 << 48) | (8194 << 16) | 0
    assert h.ram.peek_u64(itt(1) + 8 * 63) == 0
    assert h.ram.peek_u64(itt(2) + 8 * 3) == 0
    assert [h.ram.peek_u64(COLLECTION_TABLE + 8 * n) for n in range(3)] == [
        V | (1 << 16) | 0, V | (0xFFFF_FFFF << 16) | 6, 0]
    content = read_tables(h.ram, h.its.mmio_read(R.GITS_BASER0, 8),
                          h.its.mmio_read(R.GITS_BASER0 + 8, 8), nr_vcpus=4)
    assert content.dump == h.its.dump(include_orphans=False) != h.its.dump()
    assert content.unmapped_collections == (6,)
    fresh = Harness(nr_vcpus=4, ram=h.ram)
    fresh.its.restore_tables()
    assert fresh.its.orphaned_ites() == ()
    # the kernel after a restore: the EventID is free again (before, MAPTI changed nothing)
    assert h.run(C.encode_mapti(1, 63, 8300, 0)) == [] and h.its.translate(1, 63).intid == -1
    assert fresh.run(C.encode_mapti(1, 63, 8300, 0)) == []
    assert fresh.its.translate(1, 63)[:3] == (8300, 0, 1)


def test_save_fails_when_a_device_lost_its_level2_page():
    h = Harness(enable=False)
    h.ram.poke_u64(DEVICE_TABLE, V | L2_PAGES)
    h.setup(indirect=True)
    assert h.run(C.encode_mapd(5, itt(0), 2)) == []
    h.ram.poke_u64(DEVICE_TABLE, 0)
    with pytest.raises(ItsTableError, match="DeviceID 0x5"):
        h.its.save_tables()


def test_collection_table_capacity_and_terminator():
    h = Harness(ItsConfig.spec(error_policy=ErrorPolicy.IGNORE), enable=False)
    w = h.its.mmio_write
    w(R.GITS_CBASER, 8, R.encode_cbaser(base=RAM_BASE, pages=8))
    w(R.GITS_BASER0, 8, R.encode_baser(valid=True, type_=1, base=DEVICE_TABLE, pages=1))
    w(R.GITS_BASER0 + 8, 8, R.encode_baser(valid=True, type_=4, base=COLLECTION_TABLE,
                                           pages=2, page_size=4096))      # 1024 entries
    w(R.GITS_CTLR, 4, 1)
    h.queue_pages = 8
    assert h.run(*[C.encode_mapc(n, 0) for n in range(600)]) == []
    h.ram.poke_u64(COLLECTION_TABLE + 8 * 600, 0xDEAD)
    h.its.save_tables()
    assert h.ram.peek_u64(COLLECTION_TABLE + 8 * 599) == V | 599
    assert h.ram.peek_u64(COLLECTION_TABLE + 8 * 600) == 0            # the terminator
    w(R.GITS_CTLR, 4, 0)
    w(R.GITS_BASER0 + 8, 8, R.encode_baser(valid=True, type_=4, base=COLLECTION_TABLE,
                                           pages=1, page_size=4096))      # 512 entries
    assert len(h.its.dump()["collections"]) == 600
    with pytest.raises(ItsTableError, match="do not fit"):
        h.its.save_tables()


# -- all page sizes, flat and two-level (spec config) ----------------------------------------------
@pytest.mark.parametrize("page", [4096, 16384, 65536])
@pytest.mark.parametrize("indirect", [False, True])
def test_page_sizes_and_two_level_tables_round_trip(page, indirect):
    h = Harness(ItsConfig.spec(error_policy=ErrorPolicy.IGNORE), enable=False)
    w = h.its.mmio_write
    per_l2 = page // 8
    w(R.GITS_CBASER, 8, R.encode_cbaser(base=RAM_BASE, pages=1))
    w(R.GITS_BASER0, 8, R.encode_baser(valid=True, type_=1, base=DEVICE_TABLE, pages=2,
                                       page_size=page, indirect=indirect))
    w(R.GITS_BASER0 + 8, 8, R.encode_baser(valid=True, type_=4, base=COLLECTION_TABLE, pages=1,
                                           page_size=page))
    w(R.GITS_CTLR, 4, 1)
    assert h.its.enabled
    if indirect:
        # level-1 entries 0 and 3 valid, 4K/16K/64K level-2 pages
        h.ram.poke_u64(DEVICE_TABLE, V | L2_PAGES)
        h.ram.poke_u64(DEVICE_TABLE + 24, V | (L2_PAGES + 0x10000))
        devids = [0, per_l2 - 1, 3 * per_l2 + 2]
        bad = [per_l2, 2 * per_l2]
    else:
        devids = [0, 5, 2 * per_l2 - 1]
        bad = [2 * per_l2]
    cmds = [C.encode_mapc(1, 0)]
    for n, d in enumerate(devids):
        cmds += [C.encode_mapd(d, itt(n), 3), C.encode_mapti(d, n, 8192 + n, 1)]
    assert h.run(*cmds) == []
    for d in bad:
        assert h.run(C.encode_mapd(d, itt(9), 3)) == [C.E_ITS_MAPD_DEVICE_OOR]
    h.its.save_tables()
    baser0 = h.its.mmio_read(R.GITS_BASER0, 8)
    assert read_tables(h.ram, baser0, h.its.mmio_read(R.GITS_BASER0 + 8, 8)).dump == h.its.dump()
    assert sorted(h.its.dump()["devices"]) == sorted(devids)
