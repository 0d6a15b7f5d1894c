"""Whole-model save/load (JSON-able), the canonical dump, and reset."""

import copy
import json

import pytest

from kvmits.its import CollectionUnmap, ErrorPolicy, ItsConfig
from kvmits.its import commands as C
from kvmits.its import registers as R
from tests.its.ramfake import Harness, itt

REGISTERS = [(R.GITS_CTLR, 4), (R.GITS_IIDR, 4), (R.GITS_TYPER, 8), (R.GITS_CBASER, 8),
             (R.GITS_CWRITER, 8), (R.GITS_CREADR, 8)] + [(R.GITS_BASER0 + 8 * n, 8)
                                                         for n in range(8)]


def registers(its):
    return [its.mmio_read(off, size) for off, size in REGISTERS]


def busy_harness(config=None):
    h = Harness(config, nr_vcpus=3)
    h.run(C.encode_mapc(0, 1), C.encode_mapc(1, 2), C.encode_mapd(4, itt(4), 5),
          C.encode_mapd(9, itt(9), 3), C.encode_mapti(4, 1, 8192, 0),
          C.encode_mapti(4, 2, 8193, 1), C.encode_mapti(9, 7, 8194, 5),
          C.encode_mapti(9, 6, 8195, 1), C.encode_mapc(1, 0, valid=False))   # orphans 8193/8195
    return h


def test_save_state_is_json_and_round_trips():
    h = busy_harness()
    state = json.loads(json.dumps(h.its.save_state()))
    other = Harness(nr_vcpus=3, enable=False, ram=h.ram)
    other.its.load_state(state)
    assert other.its.dump() == h.its.dump()
    assert registers(other.its) == registers(h.its)
    mine, theirs = other.its.save_state(), h.its.save_state()
    assert mine.pop("generation") > theirs.pop("generation")      # loading is a change
    assert mine == theirs
    assert sorted(other.sink.of("mapped"), key=str) == sorted(h.its.ite_lpis(), key=str)
    assert (8192, 1) in other.sink.of("mapped") and (8193, None) in other.sink.of("mapped")
    # both behave the same from here: orphans stay orphans, placeholder 5 maps
    cmds = (C.encode_mapc(1, 2), C.encode_mapc(5, 2), C.encode_int(4, 2), C.encode_int(9, 7),
            C.encode_movi(9, 6, 0), C.encode_discard(4, 1))
    h.sink.clear()
    other.sink.clear()
    assert h.run(*cmds) == other.run(*cmds)
    assert other.its.dump() == h.its.dump()
    assert other.sink.calls == h.sink.calls
    assert ("set_pending", 8194, 2) in h.sink.calls


def test_save_state_keeps_a_stalled_queue():
    h = Harness(ItsConfig(error_policy=ErrorPolicy.STALL))
    h.run(C.encode_int(1, 1), C.encode_mapc(0, 0))
    assert h.its.stalled
    other = Harness(ItsConfig(error_policy=ErrorPolicy.STALL), enable=False, ram=h.ram)
    other.its.load_state(h.its.save_state())
    assert other.its.mmio_read(R.GITS_CREADR, 8) == 1 and other.its.pending_commands == 2
    other.ram.poke(other.queue_base, C.encode_sync())
    other.its.mmio_write(R.GITS_CWRITER, 8, 64 | 1)
    assert other.its.dump()["collections"] == {0: 0}


def test_load_state_replaces_and_notifies():
    h = busy_harness()
    empty = Harness(nr_vcpus=3).its.save_state()
    h.sink.clear()
    h.its.load_state(empty)
    assert h.its.dump() == {"collections": {}, "devices": {}}
    # every ITE goes, the orphans and the one on collection 5 (no target) included
    assert sorted(h.sink.calls, key=str) == [("unmapped", 8192, 1), ("unmapped", 8193, None),
                                             ("unmapped", 8194, None), ("unmapped", 8195, None)]
    assert h.its.ite_count == 0


@pytest.mark.parametrize("path,value", [
    (("format",), "something-else"), (("version",), 2), (("registers", "enabled"), 1),
    (("registers", "cwriter"), 0x10), (("registers", "creadr"), 0x2000),
    (("registers", "baser"), [0] * 7), (("registers", "cbaser"), -1),
    (("collections",), {"0": 3}), (("collections",), {"x": 1}), (("collections",), {"70000": 0}),
    (("devices", "4", "size_bits"), 17), (("devices", "4", "events", "1"), [100, 0, False]),
    (("devices", "4", "events", "99"), [8192, 0, False]), (("devices", "4", "events", "1"), [8192, 0]),
    (("devices", "70000"), {"itt_addr": 0, "size_bits": 1, "events": {}}),
    (("placeholders",), [1 << 16]), (("devices",), []),
])
def test_load_state_validates(path, value):
    h = busy_harness()
    state = copy.deepcopy(h.its.save_state())
    target = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    before = h.its.dump()
    with pytest.raises(ValueError):
        h.its.load_state(state)
    assert h.its.dump() == before


@pytest.mark.parametrize("n, value", [
    (5, R.GITS_BASER_VALID),                       # GITS_BASER2..7 are RAZ/WI
    (1, 0xFFFE0),                                  # BASER1's RO Type and Entry_Size gone
    (0, (R.GITS_BASER_TYPE_COLLECTION << R.GITS_BASER_TYPE_SHIFT) | (7 << 48) | (2 << 8)),
    (0, (R.GITS_BASER_TYPE_DEVICE << R.GITS_BASER_TYPE_SHIFT) | (7 << 48)),   # 4K: not KVM's
])
def test_load_state_refuses_a_gits_baser_the_register_cannot_hold(n, value):
    """Found by tools/fuzz model (tests/fuzz/crashers/load-state-baser): a state with such a
    BASER loaded, and then the ITS read 1-byte 'table entries' or showed a RAZ register."""
    h = busy_harness()
    state = copy.deepcopy(h.its.save_state())
    state["registers"]["baser"][n] = value
    before = h.its.save_state()
    with pytest.raises(ValueError, match=f"GITS_BASER{n} can hold"):
        h.its.load_state(state)
    assert h.its.save_state() == before


def test_load_state_refuses_cwriter_beyond_a_valid_queue():
    """Found by tools/fuzz model (tests/fuzz/crashers/load-state-cwriter): GITS_CWRITER past
    the queue's end with the queue not marked invalid made the model read commands beyond the
    queue. Only CwriterOutOfRange.STOP_QUEUE keeps such a value, with the queue invalid."""
    h = busy_harness()
    state = copy.deepcopy(h.its.save_state())
    state["registers"]["cwriter"] = 0x2000                 # the queue is one 4 KiB page
    with pytest.raises(ValueError, match="CWRITER is beyond"):
        h.its.load_state(state)
    state["registers"]["queue_invalid"] = True
    h.its.load_state(state)
    assert h.its.pending_commands == 0
    assert h.its.process_commands() == 0


def test_load_state_refuses_an_invalid_queue_with_cwriter_inside_it():
    """Found by tools/fuzz model (tests/fuzz/crashers/load-state-queue-invalid): the queue
    marked invalid with an in-range GITS_CWRITER loaded, and then no GITS_CREADR poll ran the
    commands before it (the guest waits for ever)."""
    h = busy_harness()
    h.ram.poke(h.queue_base, C.encode_sync())
    state = copy.deepcopy(h.its.save_state())
    state["registers"]["cwriter"] = state["registers"]["creadr"] + 32
    state["registers"]["queue_invalid"] = True
    with pytest.raises(ValueError, match="queue_invalid with CWRITER inside"):
        h.its.load_state(state)
    state["registers"]["queue_invalid"] = False
    h.its.load_state(state)
    assert h.its.mmio_read(R.GITS_CREADR, 8) == state["registers"]["cwriter"]


def test_load_state_keeps_an_unmapped_collection_of_kept_ites_unmapped():
    """CollectionUnmap.KEEP: MAPC V=0 leaves ITEs naming an ICID that is neither mapped nor a
    placeholder; load_state made it a placeholder, so the round trip changed the state (and a
    later MAPC of it skipped the collection table check). Found by tools/fuzz model
    (tests/fuzz/crashers/load-state-keep-placeholder)."""
    config = ItsConfig(collection_unmap=CollectionUnmap.KEEP)
    h = Harness(config, nr_vcpus=2)
    assert h.run(C.encode_mapc(1, 1), C.encode_mapd(2, itt(2), 3), C.encode_mapti(2, 0, 8192, 1),
                 C.encode_mapc(1, 0, valid=False)) == []
    state = h.its.save_state()
    other = Harness(config, nr_vcpus=2, enable=False, ram=h.ram)
    other.its.load_state(state)
    mine, theirs = other.its.save_state(), dict(state)
    mine.pop("generation"), theirs.pop("generation")
    assert mine == theirs
    assert other.its.unmapped_collections() == h.its.unmapped_collections() == ()
    # ORPHAN (KVM) still repairs a state whose ITE names an unknown ICID: a placeholder
    state = copy.deepcopy(busy_harness().its.save_state())
    state["placeholders"] = []
    plain = Harness(nr_vcpus=3, enable=False)
    plain.its.load_state(state)
    assert plain.its.unmapped_collections() == (5,)


def test_load_state_respects_the_ite_limit():
    h = busy_harness()
    small = Harness(ItsConfig(max_ites=2), nr_vcpus=3)
    with pytest.raises(ValueError, match="limit"):
        small.its.load_state(h.its.save_state())


def test_dump_is_canonical_and_ignores_insertion_order():
    a = Harness(nr_vcpus=4)
    b = Harness(nr_vcpus=4)
    a.run(C.encode_mapc(3, 1), C.encode_mapc(1, 2), C.encode_mapd(8, itt(8), 4),
          C.encode_mapd(2, itt(2), 4), C.encode_mapti(8, 5, 9000, 1), C.encode_mapti(8, 1, 9001, 3))
    b.run(C.encode_mapd(2, itt(2), 4), C.encode_mapd(8, itt(8), 4), C.encode_mapc(1, 2),
          C.encode_mapc(3, 1), C.encode_mapti(8, 1, 9001, 3), C.encode_mapti(8, 5, 9000, 1))
    assert a.its.dump() == b.its.dump()
    assert json.dumps(a.its.dump()) == json.dumps(b.its.dump())      # same key order too
    assert list(a.its.dump()["devices"]) == [2, 8]
    assert list(a.its.dump()["devices"][8]["events"]) == [1, 5]


def test_reset_is_the_in_kernel_its_reset():
    h = busy_harness()
    h.sink.clear()
    h.its.reset()
    assert h.its.mmio_read(R.GITS_CTLR, 4) == 0x8000_0000
    assert h.its.mmio_read(R.GITS_CBASER, 8) == 0 and h.its.mmio_read(R.GITS_CREADR, 8) == 0
    baser0 = h.its.mmio_read(R.GITS_BASER0, 8)
    assert not baser0 & R.GITS_BASER_VALID and baser0 & 0xFF == 0   # other fields kept
    assert (baser0 >> 56) & 7 == 1
    assert h.its.dump() == {"collections": {}, "devices": {}}
    # every ITE goes, the orphans and the one on collection 5 (no target) included
    assert sorted(h.sink.calls, key=str) == [("unmapped", 8192, 1), ("unmapped", 8193, None),
                                             ("unmapped", 8194, None), ("unmapped", 8195, None)]
    h.setup()
    assert h.run(C.encode_mapc(0, 0)) == []
