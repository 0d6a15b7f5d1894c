"""ItsSnapshot: the translation query answered from a mapping snapshot, against the model's live
ItsModel.translate, for snapshots of the model and for snapshots decoded from saved tables (the
way the kernel's ITS is read: KVM_DEV_ARM_ITS_SAVE_TABLES, then kvmits.its.abi)."""

from __future__ import annotations

import json

import pytest

from kvmits.its import abi
from kvmits.its import commands as C
from kvmits.its import registers as R
from kvmits.its.model import (
    MISS_COLLECTION_UNMAPPED,
    MISS_NO_ITE,
    REASON_NAMES,
    Translation,
)
from kvmits.its.query import (
    SOURCE_SAVE_TABLES,
    ItsSnapshot,
    model_snapshot,
    translation_from_json,
    translation_to_json,
)
from tests.its.ramfake import Harness, itt, run_on_model

CPUS = 4
# every (DeviceID, EventID) the generated programs can touch, plus some past them
DEVIDS = list(range(9)) + [0xFFFF, 1 << 16]
EVENTIDS = list(range(0, 40)) + list(range(8192, 8230)) + [1 << 16, 0xFFFF_FFFF]


def kernel_like_snapshot(h: Harness) -> ItsSnapshot:
    """What kvmits.machine.its.query does for the kernel's ITS, with the model standing in for
    the kernel: save the tables into guest memory, decode them, no orphans visible."""
    h.its.save_tables()
    content = abi.read_tables(h.ram, h.its.mmio_read(R.GITS_BASER0, 8), h.its.mmio_read(R.GITS_BASER0 + 8, 8),
                              nr_vcpus=CPUS)
    return ItsSnapshot("kernel", SOURCE_SAVE_TABLES, h.its.enabled, content.dump,
                       content.unmapped_collections, None)


@pytest.mark.parametrize("seed", range(1, 41))
def test_a_model_snapshot_translates_like_the_model(seed):
    h = run_on_model(seed)
    snap = model_snapshot(h.its)
    for devid in DEVIDS:
        for eventid in EVENTIDS:
            assert snap.translate(devid, eventid) == h.its.translate(devid, eventid), (devid, eventid)


@pytest.mark.parametrize("seed", range(1, 41))
def test_a_saved_tables_snapshot_translates_like_the_model_but_for_orphans(seed):
    h = run_on_model(seed)
    snap = kernel_like_snapshot(h)
    orphans = set(h.its.orphaned_ites())
    assert snap.same_state(model_snapshot(h.its))
    for devid in DEVIDS:
        for eventid in EVENTIDS:
            want = h.its.translate(devid, eventid)
            if (devid, eventid) in orphans:
                assert want.reason == MISS_COLLECTION_UNMAPPED
                want = want._replace(reason=MISS_NO_ITE)       # the saved tables cannot tell
            assert snap.translate(devid, eventid) == want, (devid, eventid)


def test_the_programs_reach_every_kind_of_answer():
    """The two tests above see hits and every miss reason (else they prove little)."""
    seen = set()
    for seed in range(1, 41):
        h = run_on_model(seed)
        seen |= {h.its.translate(d, e).reason for d in DEVIDS for e in EVENTIDS}
        seen.add(bool(h.its.orphaned_ites()) and "orphans")
    h = Harness(enable=False)
    seen.add(model_snapshot(h.its).translate(0, 0).reason)
    assert seen >= set(range(len(REASON_NAMES))) | {"orphans"}


def test_each_lookup_misses_in_order():
    h = Harness(nr_vcpus=3)
    h.run(C.encode_mapc(0, 1), C.encode_mapc(1, 2), C.encode_mapd(4, itt(4), 2),
          C.encode_mapti(4, 1, 8192, 0), C.encode_mapti(4, 2, 8193, 1), C.encode_mapti(4, 3, 8194, 7),
          C.encode_mapc(1, 0, valid=False))
    snap = model_snapshot(h.its)
    assert snap.translate(4, 1) == Translation(8192, 0, 1, 0)
    names = [snap.translate(d, e).reason_name for d, e in ((5, 0), (4, 4), (4, 0), (4, 2), (4, 3))]
    assert names == ["device-unmapped", "event-out-of-range", "no-ite", "collection-unmapped",
                     "collection-unmapped"]
    assert snap.orphans == ((4, 2),) and snap.untargeted == (7,)
    h.its.mmio_write(R.GITS_CTLR, 4, 0)
    assert model_snapshot(h.its).translate(4, 1).reason_name == "its-disabled"


def test_json_round_trip():
    h = run_on_model(7)
    for snap in (model_snapshot(h.its), kernel_like_snapshot(h)):
        back = ItsSnapshot.from_json(json.loads(json.dumps(snap.to_json())))
        assert back == snap
    t = h.its.translate(*next((d, e) for d in DEVIDS for e in EVENTIDS if h.its.translate(d, e).ok))
    assert translation_from_json(json.loads(json.dumps(translation_to_json(t)))) == t


def test_same_state_sees_one_changed_mapping():
    h = run_on_model(3)
    a = model_snapshot(h.its)
    devid = next(iter(a.dump["devices"]))
    h.run(C.encode_mapd(devid, 0, 1, valid=False))
    assert not a.same_state(model_snapshot(h.its))
