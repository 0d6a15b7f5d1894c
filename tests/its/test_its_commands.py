"""Every physical ITS command: its effect, its sink calls, and each of its errors."""

import pytest

from kvmits.its import (
    MISS_COLLECTION_UNMAPPED, MISS_DEVICE_UNMAPPED, MISS_EVENT_OUT_OF_RANGE, MISS_ITS_DISABLED,
    MISS_NO_ITE, CollectionUnmap, ItsConfig, MapdRemap, MaptiOverwrite,
)
from kvmits.its import commands as C
from kvmits.its import registers as R
from tests.its.ramfake import DEVICE_TABLE, L2_PAGES, RAM_BASE, RAM_SIZE, FakeRam, Harness, itt


@pytest.fixture
def h():
    return Harness(nr_vcpus=4)


def mapped_device(h, devid=1, bits=5, icid=0, target=1, events=((0, 8192),)):
    """MAPD + MAPC + MAPTIs; returns nothing, asserts no error."""
    cmds = [C.encode_mapd(devid, itt(devid), bits), C.encode_mapc(icid, target)]
    cmds += [C.encode_mapti(devid, e, intid, icid) for e, intid in events]
    assert h.run(*cmds) == []
    h.sink.clear()


# -- MAPD ---------------------------------------------------------------------------------------
def test_mapd_maps_and_unmaps(h):
    assert h.run(C.encode_mapd(5, itt(5), 8)) == []
    assert h.its.dump()["devices"] == {5: {"events": {}, "itt_addr": itt(5), "size_bits": 8}}
    gen = h.its.generation
    assert h.run(C.encode_mapd(5, 0, 1, valid=False)) == []
    assert h.its.dump()["devices"] == {} and h.its.generation == gen + 1
    assert h.run(C.encode_mapd(6, 0, 1, valid=False)) == []    # unmapping an unmapped device
    assert h.its.generation == gen + 1


def test_mapd_itt_address_keeps_bits_51_to_8(h):
    assert h.run(C.encode_raw(C.GITS_CMD_MAPD | (2 << 32), 0xFFFF_FFE3,
                              (1 << 63) | 0xFFFF_FFFF_FFFF_FFFF)) == []
    dev = h.its.dump()["devices"][2]
    assert dev["itt_addr"] == 0x000F_FFFF_FFFF_FF00 and dev["size_bits"] == 4


@pytest.mark.parametrize("devid", [1 << 16, 0xFFFF_FFFF, 8192])
def test_mapd_device_out_of_range(h, devid):
    # 1 page of 64 KiB holds 8192 8-byte DTEs; Devbits is 16.
    assert h.run(C.encode_mapd(devid, itt(1), 4)) == [C.E_ITS_MAPD_DEVICE_OOR]
    assert h.its.dump()["devices"] == {}


def test_mapd_device_entry_must_be_in_ram():
    ram = FakeRam(size=0x18000)             # the device table's second half is not RAM
    h = Harness(ram=ram, dt_pages=1)
    assert h.run(C.encode_mapd(0xFFF, itt(0), 1)) == []          # 0x7FF8 < 0x8000
    assert h.run(C.encode_mapd(0x1000, itt(0), 1)) == [C.E_ITS_MAPD_DEVICE_OOR]


def test_mapd_itt_size_out_of_range(h):
    assert h.run(C.encode_mapd(1, itt(1), 17)) == [C.E_ITS_MAPD_ITTSIZE_OOR]
    assert h.run(C.encode_mapd(1, itt(1), 32, valid=False)) == []   # not checked for V=0
    assert h.run(C.encode_mapd(1, itt(1), 16)) == []


def test_mapd_remap_drops_events_like_kvm(h):
    mapped_device(h, events=((0, 8192), (1, 8193)))
    assert h.run(C.encode_mapd(1, itt(1), 5)) == []
    assert h.its.dump()["devices"][1]["events"] == {}
    assert sorted(h.sink.of("unmapped")) == [(8192, 1), (8193, 1)]
    assert h.its.ite_count == 0


def test_mapd_remap_keep_same_itt():
    h = Harness(ItsConfig(mapd_remap=MapdRemap.KEEP_SAME_ITT))
    mapped_device(h, bits=5, events=((0, 8192), (20, 8193)))
    assert h.run(C.encode_mapd(1, itt(1), 4)) == []            # same ITT, 16 events
    assert h.its.dump()["devices"][1]["events"] == {0: {"icid": 0, "intid": 8192}}
    assert h.sink.of("unmapped") == [(8193, 1)]
    assert h.run(C.encode_mapd(1, itt(2), 4)) == []            # another ITT: empty
    assert h.its.dump()["devices"][1]["events"] == {}


def test_mapd_unmap_notifies_every_ite(h):
    # an ITE on a collection without a target still holds its LPI in KVM: the sink hears of
    # it going, with no target
    mapped_device(h, events=((0, 8192),))
    assert h.run(C.encode_mapti(1, 1, 8193, 9)) == []          # collection 9 not mapped
    assert h.sink.of("mapped")[-1] == (8193, None)
    assert h.run(C.encode_mapd(1, 0, 1, valid=False)) == []
    assert sorted(h.sink.of("unmapped"), key=str) == [(8192, 1), (8193, None)]
    assert h.sink.refs == {}


def test_mapd_unmap_and_discard_zero_the_freed_entries_like_kvm():
    """Linux 6.13 (and 6.1.120+, 6.12.y): MAPD V=0 zeroes the device table entry, also of a
    device that was not mapped, and DISCARD the ITE; before, the memory kept what a save wrote."""
    for zero in (True, False):
        h = Harness(ItsConfig(zero_freed_entries=zero), nr_vcpus=4)
        mapped_device(h, events=((0, 8192), (1, 8193)))
        h.its.save_tables()
        dte = DEVICE_TABLE + 1 * 8
        ite0, ite1 = itt(1), itt(1) + 8
        assert h.ram.peek_u64(dte) and h.ram.peek_u64(ite0) and h.ram.peek_u64(ite1)
        assert h.run(C.encode_discard(1, 0)) == []
        assert (h.ram.peek_u64(ite0) == 0) == zero and h.ram.peek_u64(ite1)
        assert h.run(C.encode_mapd(1, 0, 1, valid=False)) == []
        assert (h.ram.peek_u64(dte) == 0) == zero
        h.ram.poke_u64(DEVICE_TABLE + 7 * 8, 0x1234)
        assert h.run(C.encode_mapd(7, 0, 1, valid=False)) == []
        assert (h.ram.peek_u64(DEVICE_TABLE + 7 * 8) == 0) == zero
        assert h.its.dump()["devices"] == {}


def test_a_freed_entry_outside_guest_ram_is_counted_not_raised():
    h = Harness(ItsConfig(zero_freed_entries=True), nr_vcpus=4)
    bad_itt = 0xF000_0000                       # the ITT address MAPD took is not RAM
    assert h.run(C.encode_mapd(1, bad_itt, 4), C.encode_mapc(0, 1), C.encode_mapti(1, 0, 8192, 0),
                 C.encode_discard(1, 0)) == []
    assert h.its.zero_write_faults == 1 and h.its.stats()["zero_write_faults"] == 1


# -- MAPC ---------------------------------------------------------------------------------------
def test_mapc_maps_retargets_and_unmaps(h):
    mapped_device(h, icid=2, target=1, events=((0, 8192), (1, 8193)))
    assert h.run(C.encode_mapc(2, 3)) == []
    assert h.its.dump()["collections"] == {2: 3}
    assert h.sink.calls == [("move", 8192, 1, 3), ("move", 8193, 1, 3)]
    assert h.its.translate(1, 1).target == 3
    h.sink.clear()
    gen = h.its.generation
    assert h.run(C.encode_mapc(2, 3)) == [] and h.its.generation == gen   # no change to the mappings,
    assert h.sink.calls == [("move", 8192, 3, 3), ("move", 8193, 3, 3)]   # but KVM re-applies the target
    h.sink.clear()
    assert h.run(C.encode_mapc(2, 0, valid=False)) == []
    assert h.its.dump()["collections"] == {}
    # the ITEs stay, and with them KVM's interrupts (target and pending state): nothing to tell
    assert h.sink.calls == [] and h.sink.refs == {8192: 1, 8193: 1}
    assert h.its.translate(1, 0).reason == MISS_COLLECTION_UNMAPPED


@pytest.mark.parametrize("valid", [True, False])
def test_mapc_processor_number_out_of_range(h, valid):
    assert h.run(C.encode_mapc(0, 4, valid)) == [C.E_ITS_MAPC_PROCNUM_OOR]
    assert h.run(C.encode_raw(C.GITS_CMD_MAPC, 0, (1 << 63) | (0xFFFF_FFFF << 16))) == [
        C.E_ITS_MAPC_PROCNUM_OOR]


def test_mapc_rdbase_bits_above_47_are_ignored_like_kvm(h):
    assert h.run(C.encode_raw(C.GITS_CMD_MAPC, 0, (1 << 63) | (7 << 48) | (2 << 16) | 5)) == []
    assert h.its.dump()["collections"] == {5: 2}


def test_mapc_collection_out_of_range(h):
    # one 64 KiB page holds 8192 collection entries
    assert h.run(C.encode_mapc(8192, 0)) == [C.E_ITS_MAPC_COLLECTION_OOR]
    assert h.run(C.encode_mapc(8191, 0)) == []
    big = Harness(ct_pages=8)          # 8 x 64 KiB = 65536 entries
    assert big.run(C.encode_mapc(0xFFFF, 0)) == []


def test_mapc_of_a_collection_mapti_named_first(h):
    assert h.run(C.encode_mapd(1, itt(1), 4), C.encode_mapti(1, 0, 8192, 7)) == []
    # KVM creates the LPI without a target (vgic_add_lpi with no vCPU)
    assert h.sink.calls == [("mapped", 8192, None)]
    assert h.its.translate(1, 0).reason == MISS_COLLECTION_UNMAPPED
    h.sink.clear()
    assert h.run(C.encode_mapc(7, 2)) == []
    assert h.sink.calls == [("move", 8192, 2, 2)]      # update_affinity_collection gives it one
    assert h.its.translate(1, 0)[:3] == (8192, 7, 2)


def test_mapc_unmap_orphans_ites_like_kvm(h):
    mapped_device(h, icid=2, target=1, events=((0, 8192),))
    assert h.run(C.encode_mapc(2, 0, valid=False), C.encode_mapc(2, 3)) == []
    # KVM: the ITE lost its collection for good
    assert h.its.translate(1, 0).reason == MISS_COLLECTION_UNMAPPED
    assert h.run(C.encode_movi(1, 0, 2)) == [C.E_ITS_MOVI_UNMAPPED_COLLECTION]
    assert h.run(C.encode_discard(1, 0)) == [C.E_ITS_DISCARD_UNMAPPED_COLLECTION]
    assert h.its.dump()["devices"][1]["events"] == {0: {"icid": 2, "intid": 8192}}
    assert h.run(C.encode_mapd(1, 0, 1, valid=False)) == []      # only MAPD frees it
    assert h.its.ite_count == 0


def test_mapc_unmap_keep_revives_on_remap():
    h = Harness(ItsConfig(collection_unmap=CollectionUnmap.KEEP))
    mapped_device(h, icid=2, target=1, events=((0, 8192),))
    assert h.run(C.encode_mapc(2, 0, valid=False), C.encode_mapc(2, 3)) == []
    assert h.its.translate(1, 0)[:3] == (8192, 2, 3)
    assert h.sink.calls == [("move", 8192, 3, 3)]


# -- MAPTI / MAPI --------------------------------------------------------------------------------
def test_mapti_maps_an_lpi(h):
    assert h.run(C.encode_mapd(1, itt(1), 5), C.encode_mapc(0, 2),
                 C.encode_mapti(1, 31, 8192 + 31, 0)) == []
    assert h.sink.calls == [("mapped", 8223, 2)]
    assert h.its.translate(1, 31)[:3] == (8223, 0, 2)
    assert h.its.dump()["devices"][1]["events"] == {31: {"icid": 0, "intid": 8223}}


def test_mapti_errors(h):
    assert h.run(C.encode_mapd(1, itt(1), 5), C.encode_mapc(0, 2)) == []
    assert h.run(C.encode_mapti(1 << 16, 0, 8192, 0)) == [C.E_ITS_MAPTI_DEVICE_OOR]
    assert h.run(C.encode_mapti(2, 0, 8192, 0)) == [C.E_ITS_MAPTI_UNMAPPED_DEVICE]
    assert h.run(C.encode_mapti(1, 32, 8192, 0)) == [C.E_ITS_MAPTI_ID_OOR]
    assert h.run(C.encode_mapti(1, 0xFFFF_FFFF, 8192, 0)) == [C.E_ITS_MAPTI_ID_OOR]
    assert h.run(C.encode_mapti(1, 0, 8191, 0)) == [C.E_ITS_MAPTI_PHYSICALID_OOR]
    assert h.run(C.encode_mapti(1, 0, 0, 0)) == [C.E_ITS_MAPTI_PHYSICALID_OOR]
    assert h.run(C.encode_mapti(1, 0, 1 << 16, 0)) == [C.E_ITS_MAPTI_PHYSICALID_OOR]
    assert h.run(C.encode_mapti(1, 0, 0xFFFF_FFFF, 0)) == [C.E_ITS_MAPTI_PHYSICALID_OOR]
    assert h.run(C.encode_mapti(1, 0, 8192, 8192)) == [C.E_ITS_MAPTI_COLLECTION_OOR]
    assert h.its.ite_count == 0 and h.sink.calls == []


def test_mapti_lpi_bound_comes_from_the_redistributors(h):
    assert h.run(C.encode_mapd(1, itt(1), 5), C.encode_mapc(0, 2)) == []
    h.lpi_limit = 8200                          # guest programmed a smaller GICR_PROPBASER.IDbits
    assert h.run(C.encode_mapti(1, 0, 8200, 0)) == [C.E_ITS_MAPTI_PHYSICALID_OOR]
    assert h.run(C.encode_mapti(1, 0, 8199, 0)) == []


def test_mapti_over_an_existing_ite_kvm_keeps_the_old_one(h):
    mapped_device(h, events=((0, 8192),))
    assert h.run(C.encode_mapti(1, 0, 9000, 0)) == []
    assert h.its.translate(1, 0).intid == 8192 and h.sink.calls == []


def test_mapti_over_an_existing_ite_replace():
    h = Harness(ItsConfig(mapti_overwrite=MaptiOverwrite.REPLACE))
    mapped_device(h, events=((0, 8192),))
    assert h.run(C.encode_mapc(1, 3), C.encode_mapti(1, 0, 9000, 1)) == []
    assert h.its.translate(1, 0)[:3] == (9000, 1, 3)
    assert h.sink.calls == [("unmapped", 8192, 1), ("mapped", 9000, 3)]
    assert h.its.ite_count == 1


def test_mapti_resource_limit():
    h = Harness(ItsConfig(max_ites=2))
    mapped_device(h, events=((0, 8192), (1, 8193)))
    assert h.run(C.encode_mapti(1, 2, 8194, 0)) == [C.E_ITS_OUT_OF_RESOURCES]
    assert h.run(C.encode_discard(1, 0), C.encode_mapti(1, 2, 8194, 0)) == []


def test_mapi_uses_the_eventid_as_the_lpi(h):
    assert h.run(C.encode_mapd(1, itt(1), 14), C.encode_mapc(0, 0)) == []
    assert h.run(C.encode_mapi(1, 100, 0)) == [C.E_ITS_MAPI_PHYSICALID_OOR]
    assert h.run(C.encode_mapi(1, 8192 + 5, 0)) == []
    assert h.its.translate(1, 8197)[:3] == (8197, 0, 0)
    assert h.run(C.encode_mapi(2, 8192, 0)) == [C.E_ITS_MAPI_UNMAPPED_DEVICE]
    assert h.run(C.encode_mapi(1, 1 << 14, 0)) == [C.E_ITS_MAPI_ID_OOR]
    assert h.run(C.encode_mapi(1 << 20, 8192, 0)) == [C.E_ITS_MAPI_DEVICE_OOR]
    assert h.run(C.encode_mapi(1, 8192, 9000)) == [C.E_ITS_MAPI_COLLECTION_OOR]


# -- MOVI / MOVALL ------------------------------------------------------------------------------
def test_movi_moves_an_lpi(h):
    mapped_device(h, icid=0, target=1, events=((0, 8192),))
    assert h.run(C.encode_mapc(1, 3), C.encode_movi(1, 0, 1)) == []
    assert h.sink.calls == [("move", 8192, 1, 3)] and h.sink.refs == {8192: 1}
    assert h.its.translate(1, 0)[:3] == (8192, 1, 3)


def test_movi_to_a_collection_on_the_same_target(h):
    mapped_device(h, icid=0, target=1, events=((0, 8192),))
    gen = h.its.generation
    assert h.run(C.encode_mapc(1, 1), C.encode_movi(1, 0, 1)) == []
    assert h.sink.calls == [("move", 8192, 1, 1)] and h.its.translate(1, 0).icid == 1
    assert h.its.generation == gen + 2


def test_movi_errors(h):
    mapped_device(h, icid=0, target=1, events=((0, 8192),))
    assert h.run(C.encode_movi(1 << 16, 0, 0)) == [C.E_ITS_MOVI_DEVICE_OOR]
    assert h.run(C.encode_movi(2, 0, 0)) == [C.E_ITS_MOVI_UNMAPPED_DEVICE]
    assert h.run(C.encode_movi(1, 32, 0)) == [C.E_ITS_MOVI_ID_OOR]
    assert h.run(C.encode_movi(1, 1, 0)) == [C.E_ITS_MOVI_UNMAPPED_INTERRUPT]
    assert h.run(C.encode_movi(1, 0, 5)) == [C.E_ITS_MOVI_UNMAPPED_COLLECTION]
    assert h.sink.calls == []


def test_movall(h):
    assert h.run(C.encode_movall(0, 3)) == []
    assert h.run(C.encode_movall(2, 2)) == []
    assert h.sink.calls == [("move_all", 0, 3)]
    assert h.run(C.encode_movall(4, 0)) == [C.E_ITS_MOVALL_PROCNUM_OOR]
    assert h.run(C.encode_movall(0, 4)) == [C.E_ITS_MOVALL_PROCNUM_OOR]


# -- DISCARD ------------------------------------------------------------------------------------
def test_discard_removes_an_ite(h):
    """KVM frees the ITE and leaves a pending LPI pending (the kernel delivers it afterwards:
    the differential check's masked programs); the architecture's DISCARD clears it too."""
    mapped_device(h, events=((0, 8192), (1, 8193)))
    assert h.run(C.encode_int(1, 0), C.encode_discard(1, 0)) == []
    assert h.sink.calls == [("set_pending", 8192, 1), ("unmapped", 8192, 1)]
    assert h.its.translate(1, 0).reason == MISS_NO_ITE and h.its.ite_count == 1
    spec = Harness(ItsConfig.spec(), nr_vcpus=4)
    mapped_device(spec, events=((0, 8192), (1, 8193)))
    assert spec.run(C.encode_discard(1, 0)) == []
    assert spec.sink.calls == [("clear_pending", 8192, 1), ("unmapped", 8192, 1)]


def test_discard_errors(h):
    mapped_device(h, events=((0, 8192),))
    assert h.run(C.encode_discard(1 << 16, 0)) == [C.E_ITS_DISCARD_DEVICE_OOR]
    assert h.run(C.encode_discard(2, 0)) == [C.E_ITS_DISCARD_UNMAPPED_DEVICE]
    assert h.run(C.encode_discard(1, 1 << 5)) == [C.E_ITS_DISCARD_ID_OOR]
    assert h.run(C.encode_discard(1, 3)) == [C.E_ITS_DISCARD_UNMAPPED_INTERRUPT]
    assert h.run(C.encode_mapti(1, 3, 8195, 6), C.encode_discard(1, 3)) == [
        C.E_ITS_DISCARD_UNMAPPED_COLLECTION]
    assert h.its.ite_count == 2 and h.sink.calls == [("mapped", 8195, None)]


# -- INT / CLEAR / INV / INVALL -------------------------------------------------------------------
@pytest.mark.parametrize("encode,cmd,sink_call", [
    (C.encode_int, C.GITS_CMD_INT, "set_pending"),
    (C.encode_clear, C.GITS_CMD_CLEAR, "clear_pending"),
    (C.encode_inv, C.GITS_CMD_INV, "invalidate"),
])
def test_int_clear_inv(h, encode, cmd, sink_call):
    mapped_device(h, target=2, events=((4, 9000),))
    assert h.run(encode(1, 4)) == []
    assert h.sink.calls == [(sink_call, 9000, 2)]
    e_devid, e_unmapped, e_event, e_ite, _ = C.lookup_errors(cmd)
    h.sink.clear()
    assert h.run(encode(0x10000, 4)) == [e_devid]
    assert h.run(encode(9, 4)) == [e_unmapped]
    assert h.run(encode(1, 32)) == [e_event]
    assert h.run(encode(1, 5)) == [e_ite]
    assert h.sink.calls == []


def test_int_needs_a_mapped_collection(h):
    assert h.run(C.encode_mapd(1, itt(1), 4), C.encode_mapti(1, 0, 8192, 3),
                 C.encode_int(1, 0)) == [C.E_ITS_INT_UNMAPPED_COLLECTION]
    assert h.sink.calls == [("mapped", 8192, None)]


@pytest.mark.parametrize("encode,code", [(C.encode_clear, C.E_ITS_CLEAR_UNMAPPED_COLLECTION),
                                         (C.encode_inv, C.E_ITS_INV_UNMAPPED_COLLECTION)])
def test_clear_inv_on_unmapped_collection_kvm_accepts_strict_refuses(encode, code):
    for strict in (False, True):
        h = Harness(ItsConfig(strict_collection_checks=strict))
        errors = h.run(C.encode_mapd(1, itt(1), 4), C.encode_mapti(1, 0, 8192, 3), encode(1, 0))
        assert errors == ([code] if strict else [])
        # KVM acts on the LPI all the same (its pending latch, its configuration): the sink is
        # told, with no target; the strict model refuses and tells nothing
        told = [] if strict else [(encode.__name__.replace("encode_", "").replace("clear", "clear_pending")
                                   .replace("inv", "invalidate"), 8192, None)]
        assert h.sink.calls == [("mapped", 8192, None)] + told
        assert h.its.targetless_commands == (0 if strict else 1)


def test_invall(h):
    assert h.run(C.encode_mapc(3, 2), C.encode_invall(3)) == []
    assert h.sink.calls == [("invalidate_all", 2)]
    assert h.run(C.encode_invall(4)) == [C.E_ITS_INVALL_UNMAPPED_COLLECTION]


# -- SYNC and the commands this model does not implement -------------------------------------------
def test_sync_always_succeeds(h):
    assert h.run(C.encode_sync(0), C.encode_sync(0xFFFF_FFFF)) == []


@pytest.mark.parametrize("cmd", [0x00, 0x02, 0x06, 0x07, 0x10, C.GITS_CMD_VSYNC,
                                 C.GITS_CMD_VMAPP, C.GITS_CMD_VMAPTI, C.GITS_CMD_VMOVP,
                                 C.GITS_CMD_VINVALL, C.GITS_CMD_INVDB, 0xFF])
def test_unknown_and_gicv4_commands_are_errors(h, cmd):
    assert h.run(C.encode_raw(cmd | (1 << 32), 0xFFFF, 0xFFFF)) == [C.E_ITS_UNKNOWN_COMMAND]
    assert h.its.creadr == 32 and h.its.dump() == {"collections": {}, "devices": {}}


# -- translation ---------------------------------------------------------------------------------
def test_translation_miss_reasons_and_counters(h):
    mapped_device(h, bits=4, events=((0, 8192),))
    assert h.run(C.encode_mapti(1, 1, 8193, 9)) == []
    assert h.its.translate(2, 0).reason == MISS_DEVICE_UNMAPPED
    assert h.its.translate(1, 16).reason == MISS_EVENT_OUT_OF_RANGE
    assert h.its.translate(1, 2).reason == MISS_NO_ITE
    assert h.its.translate(1, 1).reason == MISS_COLLECTION_UNMAPPED
    assert h.its.translate(1, 0).ok
    for devid, eventid in ((2, 0), (1, 16), (1, 2), (1, 1), (1, 0)):
        h.its.signal_msi(devid, eventid)
    h.its.mmio_write(R.GITS_CTLR, 4, 0)
    assert h.its.translate(1, 0).reason == MISS_ITS_DISABLED
    assert h.its.signal_msi(1, 0) is False
    stats = h.its.stats()
    assert stats["msis"] == 6 and stats["msis_delivered"] == 1
    assert stats["msi_misses"] == {"its-disabled": 1, "device-unmapped": 1,
                                   "event-out-of-range": 1, "no-ite": 1,
                                   "collection-unmapped": 1}
    assert h.sink.calls == [("mapped", 8193, None), ("set_pending", 8192, 1)]


def test_translation_observer_sees_every_msi(h):
    mapped_device(h, events=((0, 8192),))
    seen = []
    h.its.translation_observers.append(lambda d, e, t: seen.append((d, e, t.reason)))
    assert h.its.signal_msi(1, 0) and not h.its.signal_msi(1, 1)
    assert seen == [(1, 0, 0), (1, 1, MISS_NO_ITE)]
    assert h.sink.calls == [("set_pending", 8192, 1)]


def test_command_and_mapping_observers(h):
    changes = []
    h.its.mapping_observers.append(changes.append)
    h.run(C.encode_mapd(1, itt(1), 4), C.encode_mapc(0, 1), C.encode_mapti(1, 2, 8192, 0),
          C.encode_int(1, 2), C.encode_movi(1, 2, 0), C.encode_discard(1, 2),
          C.encode_movall(0, 1), C.encode_mapti(1, 3, 1, 0))
    assert [c.kind for c in changes] == ["MAPD", "MAPC", "MAPTI", "DISCARD", "MOVALL"]
    assert changes[2][1:4] == (1, 2, 0) and changes[-1].generation == h.its.generation
    names = [r.name for r in h.records]
    assert names == ["MAPD", "MAPC", "MAPTI", "INT", "MOVI", "DISCARD", "MOVALL", "MAPTI"]
    assert h.records[2].fields == {"command": "MAPTI", "devid": 1, "eventid": 2,
                                   "intid": 8192, "icid": 0}
    assert h.records[-1].error_name == "E_ITS_MAPTI_PHYSICALID_OOR"
    assert [r.offset for r in h.records] == [32 * n for n in range(8)]


def test_errors_are_counted_and_logged_with_their_codes(h):
    h.run(C.encode_int(1, 0), C.encode_int(1, 0), C.encode_mapc(0, 9))
    assert h.its.error_counts == {C.E_ITS_INT_UNMAPPED_DEVICE: 2, C.E_ITS_MAPC_PROCNUM_OOR: 1}
    assert [(e.code, e.offset, e.command) for e in h.its.error_log] == [
        (0x010304, 0, 3), (0x010304, 32, 3), (0x010902, 64, 9)]
    assert h.its.error_log[0].name == "E_ITS_INT_UNMAPPED_DEVICE"
    assert h.its.stats()["errors_by_code"] == {"E_ITS_INT_UNMAPPED_DEVICE": 2,
                                                "E_ITS_MAPC_PROCNUM_OOR": 1}


# -- two-level device table at command time -----------------------------------------------------
def test_two_level_device_table_reads_level1_valid_at_mapd_time():
    h = Harness(enable=False)
    h.setup(indirect=True)          # one 64 KiB level-1 page: 8192 L1 entries x 8192 DTEs
    assert h.run(C.encode_mapd(0, itt(0), 4)) == [C.E_ITS_MAPD_DEVICE_OOR]
    h.ram.poke_u64(DEVICE_TABLE + 8 * 0, (1 << 63) | L2_PAGES)
    h.ram.poke_u64(DEVICE_TABLE + 8 * 7, (1 << 63) | (L2_PAGES + 0x10000))
    assert h.run(C.encode_mapd(0, itt(0), 4), C.encode_mapd(8191, itt(1), 4),
                 C.encode_mapd(7 * 8192 + 5, itt(2), 4)) == []
    assert h.run(C.encode_mapd(8192, itt(3), 4)) == [C.E_ITS_MAPD_DEVICE_OOR]
    # the level-1 entry is read each time: clearing Valid makes the next MAPD fail
    h.ram.poke_u64(DEVICE_TABLE, L2_PAGES)
    assert h.run(C.encode_mapd(1, itt(4), 4)) == [C.E_ITS_MAPD_DEVICE_OOR]
    # a level-2 page outside RAM
    h.ram.poke_u64(DEVICE_TABLE + 8 * 9, (1 << 63) | (RAM_BASE + RAM_SIZE))
    assert h.run(C.encode_mapd(9 * 8192, itt(5), 4)) == [C.E_ITS_MAPD_DEVICE_OOR]
    assert sorted(h.its.dump()["devices"]) == [0, 8191, 7 * 8192 + 5]


@pytest.mark.parametrize("checks", [True, False])
def test_mapc_unmap_with_a_target_past_the_last_vcpu(checks):
    """Linux 6.1 checks RDbase for MAPC V=0 too; since 6.7 V=0 unmaps whatever RDbase says."""
    h = Harness(ItsConfig(mapc_unmap_checks_target=checks), nr_vcpus=4)
    assert h.run(C.encode_mapc(5, 2)) == []
    assert h.run(C.encode_mapc(5, 4, valid=False)) == ([C.E_ITS_MAPC_PROCNUM_OOR] if checks else [])
    assert h.its.dump()["collections"] == ({5: 2} if checks else {})
    assert h.run(C.encode_mapc(5, 4)) == [C.E_ITS_MAPC_PROCNUM_OOR]     # V=1: always checked


def test_kvm_config_by_kernel_release():
    from kvmits.its.config import kernel_version

    assert not ItsConfig.kvm("6.12.118+deb13-arm64").mapc_unmap_checks_target
    assert ItsConfig.kvm("#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 (2025-10-07)").mapc_unmap_checks_target
    assert ItsConfig.kvm("6.1.192").zero_freed_entries and not ItsConfig.kvm("6.1.119").zero_freed_entries
    assert not ItsConfig.kvm("6.12.4").zero_freed_entries and ItsConfig.kvm("6.13").zero_freed_entries
    assert not ItsConfig.kvm("6.6.60").zero_freed_entries        # a line without the backport
    assert ItsConfig.kvm("6.12.118", command_budget=7).command_budget == 7
    with pytest.raises(ValueError, match="patch level"):
        kernel_version("6.1.0-57-arm64")                          # Debian's ABI name says nothing
    with pytest.raises(ValueError):
        kernel_version("my-kernel")
