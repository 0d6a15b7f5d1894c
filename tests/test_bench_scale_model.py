"""Part 6 of `kvmits bench`, the ITS model's curves (kvmits.bench.scale_model), at tiny sizes:
the figures' shape, and that the events are mapped by commands through the queue. No figure is
compared with a number: how fast is the benchmark's business."""

from __future__ import annotations

import pytest

from kvmits.bench import GROWTH_CLASSES, curves, growth
from kvmits.bench.schema import check_figure
from kvmits.bench.scale_model import EVENTS_PER_DEVICE, ITT_ALIGN, NR_VCPUS, ScaleIts, Sizes, model_figures
from kvmits.its import abi
from kvmits.its import commands as C
from kvmits.its import registers as R

FIGURES = {  # name: (path, unit, better)
    "scale_commands": ("model", "commands/s", "higher"),
    "scale_batch": ("model", "us", "lower"),
    "scale_translate": ("model", "us", "lower"),
    "scale_memory": ("model_state", "bytes", "lower"),
}


def tiny_sizes() -> Sizes:
    sizes = Sizes(quick=True, repeat=1)
    sizes.events = (10, 100)
    sizes.batch, sizes.batches, sizes.latency, sizes.calls, sizes.passes = 32, 2, 3, 200, 2
    return sizes


def test_the_sizes_of_a_quick_and_a_full_run():
    assert Sizes(True, 3).events == (10, 100, 1000) and Sizes(True, 3).repeat == 3
    full = Sizes(False, 1)
    assert full.events == (10, 100, 1_000, 10_000, 100_000)
    # a batch is published by one GITS_CWRITER write and fits the queue and the default budget
    assert full.batch <= 1024 and Sizes(True, 1).batch < full.batch


def test_model_figures_at_tiny_sizes():
    messages = []
    figures = model_figures(tiny_sizes(), messages.append)
    assert len(messages) == 2 and "10 events" in messages[0] and "100 events" in messages[1]
    assert sorted((f["name"], f["size"]) for f in figures) == sorted(
        (name, n) for name in FIGURES for n in (10, 100))
    for f in figures:
        check_figure(f)
        assert (f["part"], f["its"], f["size_of"], f["cpus"]) == (6, "user", "events", NR_VCPUS)
        assert (f["path"], f["unit"], f["better"]) == FIGURES[f["name"]]
        assert f["stats"]["min"] > 0
    by = {(f["name"], f["size"]): f for f in figures}
    for n in (10, 100):
        memory = by[("scale_memory", n)]
        assert memory["stats"]["n"] == 1 and memory["bytes_per_event"] == memory["stats"]["median"] / n
        assert by[("scale_commands", n)]["stats"]["n"] == 2 and by[("scale_batch", n)]["stats"]["n"] == 3
        assert by[("scale_translate", n)]["calls"] >= max(n, 200)
    # more events hold more memory
    assert by[("scale_memory", 100)]["stats"]["median"] > by[("scale_memory", 10)]["stats"]["median"]
    grouped = curves(figures)
    assert sorted(key[0] for key in grouped) == sorted(FIGURES)
    for figs in grouped.values():
        g = growth([(f["size"], f["stats"]["median"]) for f in figs], figs[0]["better"])
        assert g["growth"] in GROWTH_CLASSES and g["sizes"] == [10.0, 100.0]


def test_the_mapping_goes_through_the_command_queue():
    n = EVENTS_PER_DEVICE + 476
    with ScaleIts(n) as s:
        assert s.devices == 2 and s.its.enabled and s.its.ite_count == 0
        assert not s.its.translate(*s.event(0)).ok
        with pytest.raises(RuntimeError, match="0 ITEs"):
            s.check_mapping()
        s.map()
        # every ITE came from a MAPTI the ITS read from the queue: the commands it processed
        # are the ones issued, GITS_CREADR has caught up, and each event translates as mapped
        assert s.its.ite_count == n
        assert s.its.commands_processed == s.mapping_command_count() == NR_VCPUS + 3 + n + 1
        assert s.its.mmio_read(R.GITS_CREADR, 8) == s.its.cwriter != 0
        s.check_mapping()
        assert s.its.dump()["devices"].keys() == {0, 1, s.batch_devid}
        # the check fails when an event does not translate as mapped
        s.publish(C.encode_discard(*s.event(n - 1)) + C.encode_sync(0))
        with pytest.raises(RuntimeError, match=f"{n - 1} ITEs"):
            s.check_mapping()


def test_events_are_spread_over_devices_collections_and_the_lpis():
    n = 60_000                  # more events than LPIs (57344): they share them round-robin
    with ScaleIts(n) as s:
        assert s.devices == -(-n // EVENTS_PER_DEVICE) == 59
        assert [s.event(i) for i in (0, 1023, 1024, n - 1)] == [(0, 0), (0, 1023), (1, 0), (58, n - 1 - 58 * 1024)]
        intids = [s.ite(i)[0] for i in range(n)]
        lpis = s.its.redistributors.lpi_intid_limit() - R.LPI_BASE
        assert lpis == 57344 and len(set(intids)) == lpis
        assert min(intids) == R.LPI_BASE and max(intids) < R.LPI_BASE + lpis
        assert s.ite(lpis) == (R.LPI_BASE, lpis % NR_VCPUS)
        assert {s.ite(i)[1] for i in range(NR_VCPUS * 3)} == set(range(NR_VCPUS))
        # each device's ITT: 256-byte aligned, 8 bytes per EventID its Size allows, all in RAM,
        # none overlapping (the ITS writes zeros there on DISCARD)
        end = 0
        for devid, (itt, bits, count) in enumerate(s.layout):
            assert itt % ITT_ALIGN == 0 and itt >= end and count <= 1 << bits
            end = itt + (1 << bits) * abi.ABI_REV0_ENTRY_SIZE
            assert s.memory.contains(itt, end - itt)
        assert [bits for _, bits, _ in s.layout[-3:]] == [10, 10, 1]      # 608 events, the batch device


def test_the_queue_wraps_for_the_driver():
    with ScaleIts(10) as s:
        s.map()
        done = s.its.commands_processed
        for _ in range(3):                      # 3 x 20000 commands: twice across the end
            s.publish(C.encode_sync(0) * 20_000)
        assert s.its.commands_processed == done + 60_000 and s.its.creadr == s.its.cwriter
        with pytest.raises(ValueError):
            s.write(C.encode_sync(0) * s.slots)     # 32768 commands cannot be outstanding
