"""The differential check's programs on the host: reproducible, mostly valid commands on mapped
state with about one in six failing, orphans probed, differences reported (the check itself
runs in tests/arm64/test_differential.py)."""

from __future__ import annotations

from collections import Counter

from kvmits.its import commands as C
from kvmits.lab.differential import LENGTH, PROBE_LPI, compare, compare_pending, generate_program, probe_ops
from tests.its.ramfake import RAM_BASE, run_on_model

CPUS = 4


def test_programs_are_reproducible_batches_of_one_to_six():
    a, b = generate_program(7), generate_program(7)
    assert a == b and a != generate_program(8)
    assert sum(len(batch) for batch in a) == LENGTH
    assert all(1 <= len(batch) <= 6 for batch in a)


def test_most_commands_are_valid_and_act_on_mapped_state():
    records = []
    final_ites, orphaned, mapi_ok = [], 0, 0
    for seed in range(1, 201):
        h = run_on_model(seed)
        records += h.records
        final_ites.append(h.its.ite_count)
        orphaned += bool(h.its.orphaned_ites())
        mapi_ok += any(r.name == "MAPI" and not r.error for r in h.records)
    failed = sum(1 for r in records if r.error)
    assert 0.12 <= failed / len(records) <= 0.22                    # about one in six
    # the commands that need a mapped device and an ITE mostly find them
    for name in ("MOVI", "DISCARD", "INT", "MAPTI"):
        of = [r for r in records if r.name == name]
        assert sum(1 for r in of if not r.error) / len(of) >= 0.6, name
    assert sum(final_ites) / len(final_ites) >= 6                   # programs build real state
    assert orphaned >= 20 and mapi_ok >= 20                         # the rarer paths occur
    kinds = Counter(C.error_name(r.error) for r in records if r.error)
    assert len(kinds) >= 15                                         # many different errors


def test_the_probe_is_ignored_where_the_orphan_is():
    seed = next(s for s in range(1, 200) if run_on_model(s).its.orphaned_ites())
    h = run_on_model(seed)
    before = h.its.dump()
    probed = run_on_model(seed, probe=True)
    probes = probed.records[-len(h.its.orphaned_ites()):]
    assert [r.name for r in probes] == ["MAPTI"] * len(probes) and not any(r.error for r in probes)
    assert probed.its.dump() == before                  # MAPTI over an existing ITE: KVM keeps it
    # an ITS without the orphan takes the probe: a new ITE the saved tables show
    devid, eventid = h.its.orphaned_ites()[0]
    assert h.run(C.encode_mapd(devid, 0, 1, valid=False), C.encode_mapd(devid, RAM_BASE + 0x1F0000, 5)) == []
    h.enqueue(*(op.encode(lambda d, b: 0) for op in probe_ops([(devid, eventid)])))
    assert h.its.dump(include_orphans=False)["devices"][devid]["events"][eventid]["intid"] == PROBE_LPI


def test_compare_names_every_difference():
    dev = {"itt_addr": 0x1000, "size_bits": 4, "events": {3: {"icid": 1, "intid": 8200}}}
    kernel = {"collections": {0: 0, 1: 1}, "devices": {2: dev}, "untargeted": [5]}
    assert compare(kernel, kernel) == []
    user = {"collections": {0: 0, 1: 3}, "untargeted": [],
            "devices": {2: dict(dev, size_bits=5, events={}), 7: dev}}
    assert compare(kernel, user, orphans=[(2, 3)]) == [
        "collection 1: kernel 1, user 3",
        "collections without a target: kernel [5], user []",
        "device 0x2 size_bits: kernel 0x4, user 0x5",
        ("device 0x2 event 3: kernel {'icid': 1, 'intid': 8200}, user None (an orphaned ITE in the "
         "model: the probe MAPTI took on the kernel)"),
        "device 0x7: kernel unmapped, user mapped",
    ]


def test_compare_pending_names_every_difference():
    kernel = [(0, 8192), (2, 8193), (2, 8195)]
    assert compare_pending(kernel, list(kernel)) == []
    assert compare_pending(kernel, [(0, 8192), (1, 8193), (2, 8194)]) == [
        "LPI 8193 pending on vCPU(s): kernel [2], user [1]",
        "LPI 8194 pending on vCPU(s): kernel [], user [2]",
        "LPI 8195 pending on vCPU(s): kernel [2], user []",
    ]


def test_programs_make_lpis_pending():
    """The masked programs compare pending state only if they raise some: INTs on live ITEs."""
    ints = sum(op.name == "INT" for seed in range(1, 41) for batch in generate_program(seed) for op in batch)
    assert ints >= 80
