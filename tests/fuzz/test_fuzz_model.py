"""The ITS model's fuzz harness (kvmits.fuzz.model) without atheris: the checked-in corpus and
crashers replayed, a seeded slice, and the harness's invariants shown to catch a model broken
on purpose (docs/fuzzing.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmits.errors import GuestMemoryError
from kvmits.fuzz import model as fuzz
from kvmits.its import ItsModel
from kvmits.its import registers as R

HERE = Path(__file__).resolve().parent
CORPUS = sorted((HERE / "corpus" / "model").glob("*"))
CRASHERS = sorted((HERE / "crashers").glob("*"))


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name[:12])
def test_corpus_input_passes(path):
    fuzz.run_one(path.read_bytes())


@pytest.mark.parametrize("path", CRASHERS, ids=lambda p: p.name)
def test_crasher_passes_since_its_fix(path):
    """Each file once broke an invariant; the commit that added it fixed the model."""
    fuzz.run_one(path.read_bytes())


def test_the_corpus_is_small_and_there():
    assert 10 <= len(CORPUS) <= 200
    assert sum(p.stat().st_size for p in CORPUS) <= 64 * 1024
    assert len(CRASHERS) >= 3


def test_a_seeded_slice():
    """2,000 deterministic inputs (a few seconds): what CI runs without atheris."""
    for data in fuzz.seeded_inputs(20261206, 2000):
        fuzz.run_one(data)


def test_seeded_inputs_are_deterministic():
    assert list(fuzz.seeded_inputs(7, 5)) == list(fuzz.seeded_inputs(7, 5))
    assert list(fuzz.seeded_inputs(7, 5)) != list(fuzz.seeded_inputs(8, 5))


def test_decoder_reads_zeros_past_the_end():
    d = fuzz.Decoder(b"\x05\x01")
    assert (d.byte(), d.uint(2), d.byte(), d.below(3), d.take(2)) == (5, 1, 0, 0, b"\0\0")
    assert d.left() <= 0


def test_fuzz_memory_refuses_and_logs_outside_ram():
    mem = fuzz.FuzzMemory()
    with pytest.raises(GuestMemoryError):
        mem.read(fuzz.RAM_END - 4, 8)
    with pytest.raises(GuestMemoryError):
        mem.write(fuzz.RAM_BASE - 8, bytes(8))
    mem.write(fuzz.RAM_BASE, b"\1" * 8)
    assert mem.read(fuzz.RAM_BASE, 8) == b"\1" * 8
    assert [a[:4] for a in mem.log] == [("read", fuzz.RAM_END - 4, 8, False),
                                        ("write", fuzz.RAM_BASE - 8, 8, False),
                                        ("write", fuzz.RAM_BASE, 8, True),
                                        ("read", fuzz.RAM_BASE, 8, True)]


# -- inputs built by hand: a header (kvmits.fuzz.model.decode_config, _Session) and operations --
OP = {}
for _n, _f in enumerate(fuzz._Session.OPS):
    OP.setdefault(_f.__name__, _n)
BUDGETS = (1, 2, 3, 7, 64, 1024)


def header(budget: int = 1024, vcpus: int = 2) -> bytes:
    """ItsConfig() with command_budget overridden, `vcpus` vCPUs, a driver's set-up first."""
    return bytes([0, 1, 0x9E, 0x01, 0, BUDGETS.index(budget), 4, 0, 0, 0, 0, 0,
                  vcpus - 1, 0, 0x02])


def syncs(n: int) -> bytes:
    """n SYNC commands, one 8-byte GITS_CWRITER write."""
    return bytes([OP["op_commands"], n - 1, *[8, 0] * n, 1])


def poll_creadr() -> bytes:
    return bytes([OP["op_read"], 0, fuzz.KNOWN_OFFSETS.index(R.GITS_CREADR), fuzz.SIZES.index(8)])


def mapping() -> bytes:
    """MAPD 1 and MAPTI 1/0 -> 8192 on collection 0 (ITT at ITT_AREA, 1 EventID bit)."""
    mapd = [0, 1, 0, 0, 0]                  # devid 1, ITT_AREA, 1 bit, V=1
    mapti = [2, 1, 0, 0, 0]                 # devid 1, event 0, pINTID 8192, ICID 0
    return bytes([OP["op_commands"], 1, *mapd, *mapti, 1])


def test_hand_built_inputs_pass_on_the_real_model():
    for data in (header(1) + syncs(3) + poll_creadr(), header() + syncs(5),
                 header() + mapping() + syncs(1)):
        fuzz.run_one(data)


def test_creadr_moving_backwards_is_caught(monkeypatch):
    def backwards(self, creadr, qsize):
        self._creadr = (creadr - R.ITS_CMD_SIZE) % qsize

    monkeypatch.setattr(ItsModel, "_advance", backwards)
    with pytest.raises(AssertionError, match="GITS_CREADR"):
        fuzz.run_one(header() + syncs(2))


def test_a_spent_budget_is_caught(monkeypatch):
    real = ItsModel.process_commands
    monkeypatch.setattr(ItsModel, "process_commands",
                        lambda self, budget=None: real(self, 1 << 20))
    with pytest.raises(AssertionError, match="the budget is 1"):
        fuzz.run_one(header(1) + syncs(3))


def test_a_stranded_queue_is_caught(monkeypatch):
    monkeypatch.setattr(ItsModel, "_poll", lambda self: None)
    with pytest.raises(AssertionError, match="waiting on a runnable queue"):
        fuzz.run_one(header(1) + syncs(3) + poll_creadr())


def _write_outside_ram_handled(self, rdbase):
    try:
        self.memory.write(fuzz.RAM_END, bytes(8))
    except GuestMemoryError:
        pass            # handled by the model: the harness must still see the attempt
    return 0


def _read_outside_queue_and_tables(self, rdbase):
    self.memory.read(fuzz.ITT_AREA, 8)
    return 0


def _escaping_exception(self, rdbase):
    raise KeyError(rdbase)


@pytest.mark.parametrize("sync, match", [
    (_write_outside_ram_handled, "guest memory writes|write guest memory"),
    (_read_outside_queue_and_tables, "nor a table entry"),
    (_escaping_exception, "KeyError escaped the ITS model"),
], ids=["write-outside-ram-handled", "read-outside-queue-and-tables", "exception-escapes"])
def test_a_broken_sync_command_is_caught(monkeypatch, sync, match):
    monkeypatch.setattr(ItsModel, "_cmd_sync", sync)
    with pytest.raises(AssertionError, match=match):
        fuzz.run_one(header() + syncs(1))


def test_a_lossy_save_state_is_caught(monkeypatch):
    real = ItsModel.save_state

    def forgetful(self):
        state = real(self)
        state["devices"] = {}
        return state

    monkeypatch.setattr(ItsModel, "save_state", forgetful)
    with pytest.raises(AssertionError, match="save_state"):
        fuzz.run_one(header() + mapping())


def test_broken_sink_pairing_is_caught(monkeypatch):
    def remove_quietly(self, devid, dev, eventid):
        # the ITE goes, the sink is not told (LpiSink.unmapped)
        _, icid = dev.events.pop(eventid)
        self._ite_count -= 1
        self._index_remove(icid, (devid, eventid))

    monkeypatch.setattr(ItsModel, "_remove_ite", remove_quietly)
    discard = bytes([OP["op_commands"], 0, 9, 1, 0, 1])      # DISCARD 1/0
    fuzz.run_one(header() + mapping())
    with pytest.raises(AssertionError, match="mapped/unmapped"):
        fuzz.run_one(header() + mapping() + discard)
