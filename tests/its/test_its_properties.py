"""Property-based tests: hostile register writes, command streams and tables.

Settings come from a hypothesis profile, chosen by KVMITS_ITS_PROFILE ("its-ci": a few
seconds, the default, derandomized so CI is reproducible; "its-random": as many examples, drawn
from the seed pytest's --hypothesis-seed gives, which tools/test picks and prints, so CI also
explores; "its-thorough": many more random examples, for hunting). Profiles are applied per
test, so other test suites' hypothesis settings are untouched.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

pytest.importorskip("hypothesis", reason="the ITS property tests need hypothesis "
                    "(pip install hypothesis; Debian's testbed image does not ship it)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvmits.its import ErrorPolicy, ItsConfig, ItsTableError, read_tables  # noqa: E402
from kvmits.its import commands as C  # noqa: E402
from kvmits.its import registers as R  # noqa: E402
from tests.its.ramfake import COLLECTION_TABLE, DEVICE_TABLE, RAM_BASE, RAM_SIZE, Harness, itt  # noqa: E402

settings.register_profile("its-ci", max_examples=100, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("its-random", max_examples=100, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("its-thorough", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("KVMITS_ITS_PROFILE", "its-ci"))

NR_VCPUS = 3
MAX_ACCESS = 1024 * 32          # the largest guest-memory access the model may attempt

u64 = st.integers(0, (1 << 64) - 1)
# Mostly small IDs, so that commands meet each other's mappings; sometimes the extremes.
devids = st.one_of(st.integers(0, 2), st.integers(0, 2), st.integers(0, 4),
                   st.sampled_from([8191, 8192, 0xFFFF, 0x10000, 0xFFFF_FFFF]))
eventids = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 40),
                     st.sampled_from([0xFFFF, 0x10000, 0xFFFF_FFFF]))
intids = st.one_of(st.integers(8192, 8200), st.integers(8190, 8230),
                   st.sampled_from([0, 0xFFFF, 0x10000, 0xFFFF_FFFF]))
icids = st.one_of(st.integers(0, 2), st.integers(0, 2), st.integers(0, 4),
                  st.sampled_from([8191, 8192, 0xFFFF]))
targets = st.one_of(st.integers(0, NR_VCPUS - 1), st.integers(0, NR_VCPUS),
                    st.sampled_from([0xFFFF, 0xFFFF_FFFF]))
# A coherent start: three devices and three collections mapped.
PREAMBLE = [C.encode_mapd(d, itt(d), 3) for d in range(3)] + [
    C.encode_mapc(i, i % NR_VCPUS) for i in range(3)]

# Commands with every field in range: streams of these build and tear down real mappings.
# One composite strategy (a nested one_of would be flattened and diluted by the wild one).
def _sane(kind, dev, ev, icid, target, target2, intid, valid):
    return (C.encode_mapd(dev, itt(dev), 3, valid), C.encode_mapc(icid, target, valid),
            C.encode_mapti(dev, ev, intid, icid), C.encode_movi(dev, ev, icid),
            C.encode_discard(dev, ev), C.encode_int(dev, ev), C.encode_clear(dev, ev),
            C.encode_movall(target, target2), C.encode_mapti(dev, ev, intid, icid),
            C.encode_int(dev, ev))[kind]


sane_commands = st.builds(_sane, st.integers(0, 9), st.integers(0, 1), st.integers(0, 1),
                          st.integers(0, 1), st.integers(0, NR_VCPUS - 1),
                          st.integers(0, NR_VCPUS - 1), st.integers(8192, 8196),
                          st.sampled_from([True, True, False]))

wild_commands = st.one_of(
    st.builds(lambda d, b, v, a: C.encode_mapd(d, itt(d % 64) + a, b, v), devids,
              st.integers(1, 32), st.booleans(), st.sampled_from([0, 0x100, 1 << 51])),
    st.builds(C.encode_mapc, icids, targets, st.booleans()),
    st.builds(C.encode_mapti, devids, eventids, intids, icids),
    st.builds(C.encode_mapi, devids, st.one_of(eventids, st.integers(8190, 8230)), icids),
    st.builds(C.encode_movi, devids, eventids, icids),
    st.builds(C.encode_movall, targets, targets),
    st.builds(C.encode_discard, devids, eventids),
    st.builds(C.encode_int, devids, eventids),
    st.builds(C.encode_clear, devids, eventids),
    st.builds(C.encode_inv, devids, eventids),
    st.builds(C.encode_invall, icids),
    st.builds(C.encode_sync, targets),
    st.builds(C.encode_raw, u64, u64, u64, u64),
)
commands = st.integers(0, 3).flatmap(lambda k: wild_commands if k == 0 else sane_commands)


class Reference:
    """KVM's ITS semantics written out plainly (1-page 64K tables: 8192 devices/collections)."""

    def __init__(self, limit=1 << 16):
        self.devices = {}          # devid -> [itt, bits, {eventid: [intid, icid, orphan]}]
        self.collections = {}      # icid -> target
        self.placeholders = set()
        self.limit = limit
        self.pending = set()       # (intid, target): what the sink should hold pending

    def ite(self, devid, eventid):
        dev = self.devices.get(devid)
        return None if dev is None else dev[2].get(eventid)

    def mapped_target(self, ite):
        return None if ite[2] else self.collections.get(ite[1])

    def apply(self, raw: bytes) -> bool:
        """Execute one command; True if it is an error."""
        dw0, dw1, dw2, dw3 = C.COMMAND.unpack(raw)
        cmd, devid, eventid, icid = dw0 & 0xFF, dw0 >> 32, dw1 & 0xFFFF_FFFF, dw2 & 0xFFFF
        if cmd == C.GITS_CMD_MAPD:
            bits, valid = (dw1 & 0x1F) + 1, dw2 >> 63
            if devid >= 8192 or (valid and bits > 16):
                return True
            self.devices.pop(devid, None)
            if valid:
                self.devices[devid] = [dw2 & 0x000F_FFFF_FFFF_FF00, bits, {}]
            return False
        if cmd == C.GITS_CMD_MAPC:
            target = (dw2 >> 16) & 0xFFFF_FFFF
            if target >= NR_VCPUS:
                return True
            if not dw2 >> 63:
                if icid in self.collections or icid in self.placeholders:
                    self.collections.pop(icid, None)
                    self.placeholders.discard(icid)
                    for dev in self.devices.values():
                        for ite in dev[2].values():
                            if ite[1] == icid:
                                ite[2] = True
                return False
            if icid not in self.collections and icid not in self.placeholders and icid >= 8192:
                return True
            old = self.collections.get(icid)
            self.placeholders.discard(icid)
            self.collections[icid] = target
            if old is not None and old != target:
                # A re-target moves the collection's LPIs with their pending state: KVM's
                # update_affinity_collection (tests/arm64/test_pending.py asks the kernel)
                for dev in self.devices.values():
                    for ite in dev[2].values():
                        if ite[1] == icid and not ite[2] and (ite[0], old) in self.pending:
                            self.pending.discard((ite[0], old))
                            self.pending.add((ite[0], target))
            return False
        if cmd in (C.GITS_CMD_MAPTI, C.GITS_CMD_MAPI):
            intid = dw1 >> 32 if cmd == C.GITS_CMD_MAPTI else eventid
            dev = self.devices.get(devid)
            if dev is None or eventid >= 1 << dev[1] or not 8192 <= intid < self.limit:
                return True
            if eventid in dev[2]:
                return False
            if icid not in self.collections and icid not in self.placeholders:
                if icid >= 8192:
                    return True
                self.placeholders.add(icid)
            dev[2][eventid] = [intid, icid, False]
            return False
        if cmd == C.GITS_CMD_MOVI:
            ite = self.ite(devid, eventid)
            if ite is None or self.mapped_target(ite) is None or icid not in self.collections:
                return True
            old, new = self.mapped_target(ite), self.collections[icid]
            if old != new and (ite[0], old) in self.pending:
                self.pending.discard((ite[0], old))
                self.pending.add((ite[0], new))
            ite[1] = icid
            return False
        if cmd == C.GITS_CMD_DISCARD:
            ite = self.ite(devid, eventid)
            if ite is None or self.mapped_target(ite) is None:
                return True
            # KVM frees the ITE only: a pending LPI stays pending (ItsConfig.discard_clears_pending)
            del self.devices[devid][2][eventid]
            return False
        if cmd == C.GITS_CMD_INT:
            ite = self.ite(devid, eventid)
            if ite is None or self.mapped_target(ite) is None:
                return True
            self.pending.add((ite[0], self.mapped_target(ite)))
            return False
        if cmd in (C.GITS_CMD_CLEAR, C.GITS_CMD_INV):
            ite = self.ite(devid, eventid)
            if ite is not None and cmd == C.GITS_CMD_CLEAR:
                self.pending.discard((ite[0], self.mapped_target(ite)))
            return ite is None
        if cmd == C.GITS_CMD_INVALL:
            return icid not in self.collections
        if cmd == C.GITS_CMD_MOVALL:
            t1, t2 = (dw2 >> 16) & 0xFFFF_FFFF, (dw3 >> 16) & 0xFFFF_FFFF
            if t1 >= NR_VCPUS or t2 >= NR_VCPUS:
                return True
            moved = {p for p in self.pending if p[1] == t1}
            self.pending = (self.pending - moved) | {(i, t2) for i, _ in moved}
            return False
        return cmd != C.GITS_CMD_SYNC

    def dump(self):
        return {
            "collections": dict(sorted(self.collections.items())),
            "devices": {d: {"events": {e: {"icid": i[1], "intid": i[0]}
                                       for e, i in sorted(v[2].items())},
                            "itt_addr": v[0], "size_bits": v[1]}
                        for d, v in sorted(self.devices.items())},
        }


def check_internal_consistency(h: Harness) -> None:
    its = h.its
    # the ICID index and the ITE count agree with the ITEs
    index = {}
    count = 0
    for devid, dev in its._devices.items():
        for eventid, (_, icid) in dev.events.items():
            index.setdefault(icid, set()).add((devid, eventid))
            count += 1
            assert eventid < 1 << dev.size_bits
    assert index == its._by_icid and count == its.ite_count
    # the sink heard of exactly the ITEs the model holds, per LPI (what KVM keeps an interrupt for)
    assert h.sink.refs == dict(Counter(intid for intid, _ in its.ite_lpis()))
    # command processing writes guest memory only to zero a freed entry (ItsConfig.zero_freed_entries);
    # no access is unbounded
    assert all(a[2] <= MAX_ACCESS if a[0] == "read" else a[2] == 8 for a in h.ram.accesses)


def check_against_the_reference(batches) -> None:
    """Run `batches` (after PREAMBLE) on the model and the reference; every batch, they agree on
    errors, mappings, pending LPIs and translations."""
    batches = [PREAMBLE] + batches
    h = Harness(nr_vcpus=NR_VCPUS, queue_pages=1)
    ref = Reference()
    for batch in batches:
        start = len(h.records)
        h.enqueue(*batch)
        assert h.its.creadr == h.its.cwriter and not h.its.stalled
        got = [bool(r.error) for r in h.records[start:]]
        assert got == [ref.apply(c) for c in batch]
        assert h.its.dump() == ref.dump()
        assert h.sink.pending == ref.pending
        check_internal_consistency(h)
        for devid, dev in ref.devices.items():
            for eventid, ite in dev[2].items():
                t = h.its.translate(devid, eventid)
                target = ref.mapped_target(ite)
                assert t.ok == (target is not None)
                if t.ok:
                    assert t[:3] == (ite[0], ite[1], target)


@PROFILE
@given(st.lists(st.lists(commands, min_size=5, max_size=40), min_size=1, max_size=4))
def test_command_streams_match_the_reference_model(batches):
    check_against_the_reference(batches)


def test_a_mapc_retarget_moves_a_pending_lpi():
    """The case the thorough profile shrank to (issue 16): an LPI made pending on vCPU 0, a
    MOVALL 0 -> 0, then MAPC of its collection to vCPU 1. The kernel delivers it on vCPU 1
    (tests/arm64/test_pending.py, Linux 6.1): the pending state moves with the re-target."""
    batch = [C.encode_mapd(0, itt(0), 1, valid=False)] * 17 + [
        _sane(2, 1, 0, 0, 0, 0, 8192, True), _sane(9, 1, 0, 0, 0, 0, 8192, True),
        C.encode_movall(0, 0), _sane(1, 0, 0, 0, 1, 0, 8192, True)]
    check_against_the_reference([batch])
    ref = Reference()
    for c in PREAMBLE + batch:
        ref.apply(c)
    assert ref.pending == {(8192, 1)}


@PROFILE
@given(st.lists(commands, min_size=1, max_size=60))
def test_saved_tables_decode_to_the_dump(cmds):
    cmds = PREAMBLE + cmds
    h = Harness(nr_vcpus=NR_VCPUS, queue_pages=1)
    h.enqueue(*cmds)
    # MAPD does not check ITT addresses (nor does KVM): an ITT outside RAM makes saving
    # (an ITE to write there) or restoring (the ITT to scan) fail, like the kernel's EFAULT.
    itt_outside = any(not h.ram.inside(d["itt_addr"], 8 << d["size_bits"])
                      for d in h.its.dump()["devices"].values())
    try:
        h.its.save_tables()
        content = read_tables(h.ram, h.its.mmio_read(R.GITS_BASER0, 8),
                              h.its.mmio_read(R.GITS_BASER0 + 8, 8), nr_vcpus=NR_VCPUS)
    except ItsTableError:
        assert itt_outside
        return
    # ITTs that overlap (a guest error) overwrite each other's entries, in KVM as here.
    spans = sorted((d["itt_addr"], d["itt_addr"] + (8 << d["size_bits"]))
                   for d in h.its.dump()["devices"].values())
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        return
    # orphaned ITEs are saved as invalid entries, as the kernel saves them
    assert content.dump == h.its.dump(include_orphans=False)


# -- hostile register traffic ----------------------------------------------------------------
INTERESTING_OFFSETS = [R.GITS_CTLR, R.GITS_IIDR, R.GITS_TYPER, R.GITS_TYPER + 4, R.GITS_CBASER,
                       R.GITS_CBASER + 4, R.GITS_CWRITER, R.GITS_CWRITER + 4, R.GITS_CREADR,
                       R.GITS_BASER0, R.GITS_BASER0 + 4, R.GITS_BASER0 + 8, R.GITS_BASER0 + 12,
                       R.GITS_BASER0 + 0x38, R.GITS_PIDR2, R.GITS_TRANSLATER, 0x3, 0xFFFF]
ops = st.one_of(
    st.tuples(st.just("write"), st.one_of(st.sampled_from(INTERESTING_OFFSETS),
                                          st.integers(-8, 0x20008)),
              st.sampled_from([1, 2, 3, 4, 8, 16]),
              st.one_of(u64, st.sampled_from([0, 1, 0x21, 0x1000, 0xFFFE0, 0xFFFE1]))),
    st.tuples(st.just("read"), st.one_of(st.sampled_from(INTERESTING_OFFSETS),
                                         st.integers(-8, 0x20008)),
              st.sampled_from([1, 2, 4, 8]), st.just(0)),
    st.tuples(st.just("setup"), st.integers(1, 256), st.booleans(), st.just(0)),
    st.tuples(st.just("commands"), st.lists(commands, max_size=20), st.just(0), st.just(0)),
    st.tuples(st.just("msi"), devids, eventids, st.just(0)),
    st.tuples(st.just("process"), st.integers(1, 64), st.just(0), st.just(0)),
)
configs = st.sampled_from([ItsConfig(), ItsConfig.spec(), ItsConfig(command_budget=3),
                           ItsConfig.spec(error_policy=ErrorPolicy.IGNORE, command_budget=5)])


@PROFILE
@given(configs, st.lists(ops, min_size=1, max_size=40))
def test_hostile_register_and_queue_traffic(config, operations):
    h = Harness(config, nr_vcpus=NR_VCPUS, enable=False, queue_pages=2)
    its = h.its
    for op, a, b, c in operations:
        creadr, processed = its.creadr, its.commands_processed
        qsize_before = ((its.mmio_read(R.GITS_CBASER, 8) & 0xFF) + 1) * 4096
        cbaser_before = its.mmio_read(R.GITS_CBASER, 8)
        if op == "write":
            its.mmio_write(a, b, c, devid=c & 0xFFFF)
        elif op == "read":
            value = its.mmio_read(a, b)
            assert 0 <= value < 1 << (8 * b if b in (4, 8) else 64)
        elif op == "setup":
            its.mmio_write(R.GITS_CTLR, 4, 0)
            its.mmio_write(R.GITS_CBASER, 8, R.encode_cbaser(
                base=RAM_BASE if b else RAM_BASE + RAM_SIZE - 0x10000, pages=a))
            h.queue_pages = a
            its.mmio_write(R.GITS_BASER0, 8, R.encode_baser(valid=True, type_=1,
                                                            base=DEVICE_TABLE, pages=1))
            its.mmio_write(R.GITS_BASER0 + 8, 8, R.encode_baser(valid=True, type_=4,
                                                                base=COLLECTION_TABLE, pages=1))
            its.mmio_write(R.GITS_CTLR, 4, 1)
        elif op == "commands":
            if its.cwriter < h.queue_size:
                h.enqueue(*a)
        elif op == "msi":
            its.signal_msi(a, b)
        else:
            its.process_commands(a)
        # GITS_CREADR moves only forward, by the commands executed, or back to 0 when
        # GITS_CBASER was written.
        moved = its.commands_processed - processed
        if its.mmio_read(R.GITS_CBASER, 8) != cbaser_before or op == "setup":
            assert its.creadr == 0 or moved
        else:
            assert (its.creadr - creadr) % qsize_before == (moved * 32) % qsize_before
            assert moved <= (config.command_budget * 2 if op != "process" else a)
        assert its.creadr % 32 == 0 and its.cwriter % 32 == 0
        if its.stalled:
            assert sum(its.error_counts.values()) > 0
        check_internal_consistency(h)


@PROFILE
@given(st.lists(st.tuples(st.integers(0, 0x1FFF), u64), max_size=40),
       st.lists(st.tuples(st.integers(0, 0x1FFF), u64), max_size=40),
       st.integers(1, 8), st.booleans())
def test_garbage_tables_decode_or_fail_cleanly(dtes, ctes, pages, indirect):
    h = Harness(nr_vcpus=NR_VCPUS, enable=False)
    for n, value in dtes:
        h.ram.poke_u64(DEVICE_TABLE + 8 * n, value)
    for n, value in ctes:
        h.ram.poke_u64(COLLECTION_TABLE + 8 * n, value)
    baser0 = R.encode_baser(valid=True, type_=1, base=DEVICE_TABLE, pages=pages,
                            indirect=indirect)
    h.its.mmio_write(R.GITS_BASER0, 8, baser0)
    h.its.mmio_write(R.GITS_BASER0 + 8, 8, R.encode_baser(valid=True, type_=4,
                                                          base=COLLECTION_TABLE, pages=1))
    before = h.its.dump()
    try:
        h.its.restore_tables(max_entries=20_000)
    except ItsTableError:
        assert h.its.dump() == before
    check_internal_consistency(h)
