"""GITS_* registers: reset values, access sizes, RO/WI/RES0 bits, the KVM and spec choices."""

import logging

import pytest

from kvmits.its import ItsConfig, ItsModel, RecordingSink
from kvmits.its import commands as C
from kvmits.its import registers as R
from tests.its.ramfake import COLLECTION_TABLE, DEVICE_TABLE, QUEUE, FakeRam, Harness, itt


@pytest.fixture
def its():
    return ItsModel(FakeRam(), RecordingSink(), 2)


# -- reset values: the in-kernel ITS as read on the testbed -----------------------------------
def test_reset_values_match_the_in_kernel_its(its):
    assert its.mmio_read(R.GITS_CTLR, 4) == 0x8000_0000
    assert its.mmio_read(R.GITS_IIDR, 4) == 0x4B00_043B
    assert its.mmio_read(R.GITS_TYPER, 8) == 0x1EF71
    assert its.mmio_read(R.GITS_BASER0, 8) == 0x1907_0000_0000_0600
    assert its.mmio_read(R.GITS_BASER0 + 8, 8) == 0x1C07_0000_0000_0600
    for n in range(2, 8):
        assert its.mmio_read(R.GITS_BASER0 + 8 * n, 8) == 0
    for off in (R.GITS_CBASER, R.GITS_CWRITER, R.GITS_CREADR):
        assert its.mmio_read(off, 8) == 0
    assert its.bad_access_count == 0


def test_id_registers(its):
    assert its.mmio_read(R.GITS_PIDR2, 4) == 0x3B          # ArchRev 3 (GICv3)
    assert its.mmio_read(R.GITS_PIDR0, 4) == 0x92
    assert its.mmio_read(R.GITS_PIDR1, 4) == 0xB4
    assert its.mmio_read(R.GITS_PIDR4, 4) == 0x40
    assert [its.mmio_read(o, 4) for o in (R.GITS_CIDR0, R.GITS_CIDR1, R.GITS_CIDR2,
                                          R.GITS_CIDR3)] == [0x0D, 0xF0, 0x05, 0xB1]
    assert its.mmio_read(R.GITS_PIDR3, 4) == 0
    its.mmio_write(R.GITS_PIDR2, 4, 0xFF)
    assert its.mmio_read(R.GITS_PIDR2, 4) == 0x3B
    assert its.bad_access_count == 0 and its.ro_writes == 1


def test_typer_fields_follow_the_config():
    its = ItsModel(FakeRam(), None, 1, ItsConfig(devbits=20, idbits=24))
    typer = its.mmio_read(R.GITS_TYPER, 8)
    assert typer & 1 == 1                                   # Physical
    assert (typer >> 4) & 0xF == 7                          # 8-byte ITT entries
    assert (typer >> 8) & 0x1F == 23
    assert (typer >> 13) & 0x1F == 19
    assert typer & (R.GITS_TYPER_PTA | R.GITS_TYPER_VIRTUAL | R.GITS_TYPER_SEIS | R.GITS_TYPER_CIL) == 0


def test_typer_and_iidr_are_read_only(its):
    its.mmio_write(R.GITS_TYPER, 8, 0)
    its.mmio_write(R.GITS_TYPER + 4, 4, 0xFFFF_FFFF)
    its.mmio_write(R.GITS_IIDR, 4, 0)
    assert its.mmio_read(R.GITS_TYPER, 8) == 0x1EF71
    assert its.mmio_read(R.GITS_IIDR, 4) == 0x4B00_043B
    assert its.ro_writes == 3


def test_64bit_registers_by_32bit_halves(its):
    assert its.mmio_read(R.GITS_TYPER, 4) == 0x1EF71
    assert its.mmio_read(R.GITS_TYPER + 4, 4) == 0
    assert its.mmio_read(R.GITS_BASER0 + 4, 4) == 0x1907_0000
    cb = R.encode_cbaser(base=0x1234_0000_0000, pages=4)
    its.mmio_write(R.GITS_CBASER, 4, cb & 0xFFFF_FFFF)
    its.mmio_write(R.GITS_CBASER + 4, 4, cb >> 32)
    assert its.mmio_read(R.GITS_CBASER, 8) == cb
    assert its.mmio_read(R.GITS_CBASER + 4, 4) == cb >> 32


@pytest.mark.parametrize("offset,size", [
    (R.GITS_CTLR, 8), (R.GITS_CTLR, 2), (R.GITS_CTLR, 1), (R.GITS_IIDR, 8), (1, 4),
    (R.GITS_TYPER + 2, 4), (R.GITS_TYPER + 4, 8), (R.GITS_MPAMIDR, 4), (R.GITS_STATUSR, 4),
    (R.GITS_UMSIR, 8), (0x200, 4), (0xFFCC, 4), (R.GITS_PIDR2, 8), (R.GITS_TRANSLATER + 4, 4),
    (0x10000, 4), (0x1FFFC, 4), (0x20000, 4), (-4, 4), (1 << 40, 8), (R.GITS_CBASER, 3),
])
def test_unsupported_accesses_read_zero_are_ignored_and_counted(its, offset, size):
    assert its.mmio_read(offset, size) == 0
    its.mmio_write(offset, size, 0xFFFF_FFFF)
    assert its.bad_access_count == 2
    assert its.bad_accesses[-1].offset == offset
    assert its.mmio_read(R.GITS_CTLR, 4) == 0x8000_0000
    assert its.mmio_read(R.GITS_CBASER, 8) == 0


def test_guest_error_logging_is_bounded(caplog):
    its = ItsModel(FakeRam(), None, 1, ItsConfig(log_limit=3))
    with caplog.at_level(logging.WARNING, logger="kvmits.its"):
        for _ in range(50):
            its.mmio_read(0x7, 4)
    assert its.bad_access_count == 50
    assert len(caplog.records) == 4            # three, then "further ... not logged"


# -- GITS_CTLR --------------------------------------------------------------------------------
def _program(its, *, baser0=True, baser1=True, cbaser=True):
    if cbaser:
        its.mmio_write(R.GITS_CBASER, 8, R.encode_cbaser(base=QUEUE, pages=1))
    if baser0:
        its.mmio_write(R.GITS_BASER0, 8, R.encode_baser(valid=True, type_=1, base=DEVICE_TABLE, pages=1))
    if baser1:
        its.mmio_write(R.GITS_BASER0 + 8, 8, R.encode_baser(valid=True, type_=4,
                                                            base=COLLECTION_TABLE, pages=1))


@pytest.mark.parametrize("missing", ["baser0", "baser1", "cbaser"])
def test_enable_is_ignored_until_tables_and_queue_are_valid(its, missing):
    _program(its, **{missing: False})
    its.mmio_write(R.GITS_CTLR, 4, 1)
    assert its.mmio_read(R.GITS_CTLR, 4) == 0x8000_0000
    assert its.enable_refused == 1
    _program(its)
    its.mmio_write(R.GITS_CTLR, 4, 1)
    assert its.mmio_read(R.GITS_CTLR, 4) == 0x8000_0001


def test_ctlr_other_bits_are_wi_and_disable_works(its):
    _program(its)
    its.mmio_write(R.GITS_CTLR, 4, 0xFFFF_FFFF)
    assert its.mmio_read(R.GITS_CTLR, 4) == 0x8000_0001
    its.mmio_write(R.GITS_CTLR, 4, 0)
    assert its.mmio_read(R.GITS_CTLR, 4) == 0x8000_0000


def test_quiescent_clear_while_commands_wait():
    h = Harness(enable=False)
    h.its.mmio_write(R.GITS_CBASER, 8, R.encode_cbaser(base=QUEUE, pages=1))
    h.ram.poke(QUEUE, C.encode_sync())
    h.its.mmio_write(R.GITS_CWRITER, 8, 32)            # disabled: not processed
    assert h.its.mmio_read(R.GITS_CTLR, 4) == 0
    assert h.its.pending_commands == 1
    h.setup()                                          # rewrites CBASER: queue emptied
    assert h.its.mmio_read(R.GITS_CTLR, 4) == 0x8000_0001


def test_commands_wait_while_disabled_and_run_on_enable():
    h = Harness(enable=False)
    w = h.its.mmio_write
    w(R.GITS_CBASER, 8, R.encode_cbaser(base=QUEUE, pages=1))
    w(R.GITS_BASER0, 8, R.encode_baser(valid=True, type_=1, base=DEVICE_TABLE, pages=1))
    w(R.GITS_BASER0 + 8, 8, R.encode_baser(valid=True, type_=4, base=COLLECTION_TABLE, pages=1))
    h.ram.poke(QUEUE, C.encode_mapc(0, 1))
    w(R.GITS_CWRITER, 8, 32)
    assert h.its.creadr == 0 and h.its.dump()["collections"] == {}
    w(R.GITS_CTLR, 4, 1)
    assert h.its.creadr == 32 and h.its.dump()["collections"] == {0: 1}


# -- GITS_BASER<n> ----------------------------------------------------------------------------
def test_baser_type_and_entry_size_are_read_only_and_kvm_sanitises(its):
    its.mmio_write(R.GITS_BASER0, 8, 0)
    # Type=Device, Entry_Size=8 B kept; inner Device-nGnRnE becomes RaWb; Page_Size 64K.
    assert its.mmio_read(R.GITS_BASER0, 8) == 0x1907_0000_0000_0200
    its.mmio_write(R.GITS_BASER0 + 8, 8, R.GITS_BASER_TYPE_MASK | R.GITS_BASER_ENTRY_SIZE_MASK)
    assert its.mmio_read(R.GITS_BASER0 + 8, 8) == 0x1C07_0000_0000_0200


def test_kvm_forces_64k_pages_spec_config_keeps_the_choice():
    kvm = ItsModel(FakeRam(), None, 1)
    spec = ItsModel(FakeRam(), None, 1, ItsConfig.spec())
    for page, enc in ((4096, 0), (16384, 1), (65536, 2)):
        value = R.encode_baser(valid=True, type_=1, base=0x10_0000, pages=2, page_size=page)
        kvm.mmio_write(R.GITS_BASER0, 8, value)
        spec.mmio_write(R.GITS_BASER0, 8, value)
        assert (kvm.mmio_read(R.GITS_BASER0, 8) >> 8) & 3 == 2
        assert (spec.mmio_read(R.GITS_BASER0, 8) >> 8) & 3 == enc
    # the reserved encoding 0b11 reads back as a supported size
    spec.mmio_write(R.GITS_BASER0, 8, 0x300)
    assert (spec.mmio_read(R.GITS_BASER0, 8) >> 8) & 3 == 0


def test_baser_attribute_sanitising_kvm_and_spec():
    value = (R.GITS_BASER_VALID | (1 << R.GITS_BASER_INNERCACHE_SHIFT)          # inner nC
             | (5 << R.GITS_BASER_OUTERCACHE_SHIFT) | (R.SHARE_OUTER << 10) | 0x200)
    kvm = ItsModel(FakeRam(), None, 1)
    kvm.mmio_write(R.GITS_BASER0, 8, value)
    got = kvm.mmio_read(R.GITS_BASER0, 8)
    assert (got >> 59) & 7 == R.CACHE_RaWb and (got >> 53) & 7 == 0 and (got >> 10) & 3 == 1
    spec = ItsModel(FakeRam(), None, 1, ItsConfig.spec())
    spec.mmio_write(R.GITS_BASER0, 8, value)
    got = spec.mmio_read(R.GITS_BASER0, 8)
    assert (got >> 59) & 7 == 1 and (got >> 53) & 7 == 5 and (got >> 10) & 3 == 2


def test_collection_table_indirect_bit():
    value = R.encode_baser(valid=True, type_=4, base=0x10_0000, pages=1, indirect=True)
    kvm = ItsModel(FakeRam(), None, 1)
    kvm.mmio_write(R.GITS_BASER0 + 8, 8, value)
    assert not kvm.mmio_read(R.GITS_BASER0 + 8, 8) & R.GITS_BASER_INDIRECT
    kvm.mmio_write(R.GITS_BASER0, 8, R.encode_baser(valid=True, type_=1, base=0x10_0000,
                                                    pages=1, indirect=True))
    assert kvm.mmio_read(R.GITS_BASER0, 8) & R.GITS_BASER_INDIRECT
    spec = ItsModel(FakeRam(), None, 1, ItsConfig.spec())
    spec.mmio_write(R.GITS_BASER0 + 8, 8, value)
    assert spec.mmio_read(R.GITS_BASER0 + 8, 8) & R.GITS_BASER_INDIRECT


def test_baser_halves_and_unimplemented_basers(its):
    value = R.encode_baser(valid=True, type_=1, base=0xABCD_0000, pages=7)
    its.mmio_write(R.GITS_BASER0, 4, value & 0xFFFF_FFFF)
    its.mmio_write(R.GITS_BASER0 + 4, 4, value >> 32)
    assert its.mmio_read(R.GITS_BASER0, 8) == value
    for n in range(2, 8):
        its.mmio_write(R.GITS_BASER0 + 8 * n, 8, value)
        its.mmio_write(R.GITS_BASER0 + 8 * n + 4, 4, 0xFFFF_FFFF)
        assert its.mmio_read(R.GITS_BASER0 + 8 * n, 8) == 0
    assert its.bad_access_count == 0


def test_baser_and_cbaser_writes_ignored_while_enabled():
    h = Harness()
    before = [h.its.mmio_read(o, 8) for o in (R.GITS_BASER0, R.GITS_BASER0 + 8, R.GITS_CBASER)]
    h.its.mmio_write(R.GITS_BASER0, 8, 0)
    h.its.mmio_write(R.GITS_BASER0 + 12, 4, 0)
    h.its.mmio_write(R.GITS_CBASER, 8, 0)
    after = [h.its.mmio_read(o, 8) for o in (R.GITS_BASER0, R.GITS_BASER0 + 8, R.GITS_CBASER)]
    assert before == after and h.its.ro_writes == 3


def test_baser_invalid_forgets_mappings_in_kvm_mode_only():
    for config, forgets in ((ItsConfig(), True), (ItsConfig(baser_invalid_forgets=False), False)):
        h = Harness(config)
        h.run(C.encode_mapd(1, itt(1), 4), C.encode_mapc(3, 2), C.encode_mapti(1, 0, 8192, 3))
        h.its.mmio_write(R.GITS_CTLR, 4, 0)
        h.sink.clear()
        gen = h.its.generation
        h.its.mmio_write(R.GITS_BASER0, 8, 0)
        assert (h.its.dump()["devices"] == {}) == forgets
        assert (h.sink.of("unmapped") == [(8192, 2)]) == forgets
        h.its.mmio_write(R.GITS_BASER0 + 8, 8, 0)
        assert (h.its.dump()["collections"] == {}) == forgets
        assert (h.its.generation > gen) == forgets


# -- GITS_CBASER, GITS_CWRITER, GITS_CREADR --------------------------------------------------
def test_cbaser_write_resets_creadr_and_cwriter():
    h = Harness()
    h.run(C.encode_sync(), C.encode_sync())
    assert h.its.creadr == 64 and h.its.cwriter == 64
    h.its.mmio_write(R.GITS_CTLR, 4, 0)
    h.its.mmio_write(R.GITS_CBASER + 4, 4, R.GITS_CBASER_VALID >> 32)
    assert h.its.mmio_read(R.GITS_CREADR, 8) == 0 and h.its.mmio_read(R.GITS_CWRITER, 8) == 0


def test_cbaser_address_bits_and_res0_kvm_vs_spec():
    value = R.encode_cbaser(base=0x4000_1000, pages=2) | (1 << 62) | (1 << 56) | (1 << 8)
    kvm = ItsModel(FakeRam(), None, 1)
    kvm.mmio_write(R.GITS_CBASER, 8, value)
    assert kvm.mmio_read(R.GITS_CBASER, 8) == value & ~0xF000     # 64K aligned, RES0 kept
    spec = ItsModel(FakeRam(), None, 1, ItsConfig.spec())
    spec.mmio_write(R.GITS_CBASER, 8, value)
    assert spec.mmio_read(R.GITS_CBASER, 8) == value & R.GITS_CBASER_DEFINED
    assert spec.mmio_read(R.GITS_CBASER, 8) & 0xF000 == 0x1000


def test_cwriter_offset_retry_and_res0():
    h = Harness(queue_pages=2)
    h.ram.poke(QUEUE, C.encode_sync() * 3)
    h.its.mmio_write(R.GITS_CWRITER, 8, 0xFFFF_FFFF_0000_0000 | 0x61)     # offset 0x60, Retry
    assert h.its.mmio_read(R.GITS_CWRITER, 8) == 0x60
    assert h.its.mmio_read(R.GITS_CREADR, 8) == 0x60


def test_creadr_is_read_only():
    h = Harness()
    h.its.mmio_write(R.GITS_CREADR, 8, 0x40)
    h.its.mmio_write(R.GITS_CREADR, 4, 0x40)
    assert h.its.mmio_read(R.GITS_CREADR, 8) == 0 and h.its.ro_writes == 2


def test_cwriter_beyond_queue_kvm_ignores_the_write():
    h = Harness(queue_pages=1)
    h.run(C.encode_sync())
    h.its.mmio_write(R.GITS_CWRITER, 8, 0x1000)          # == queue size: out of range
    assert h.its.mmio_read(R.GITS_CWRITER, 8) == 0x20
    assert h.its.mmio_read(R.GITS_CREADR, 8) == 0x20
    h.run(C.encode_mapc(1, 1))                           # the queue still works
    assert h.its.dump()["collections"] == {1: 1}


def test_cwriter_beyond_queue_spec_stops_the_queue_until_in_range():
    h = Harness(ItsConfig(cwriter_out_of_range=ItsConfig.spec().cwriter_out_of_range))
    h.ram.poke(QUEUE, C.encode_mapc(1, 1))
    h.its.mmio_write(R.GITS_CWRITER, 8, 0x8000)
    assert h.its.mmio_read(R.GITS_CWRITER, 8) == 0x8000
    assert h.its.creadr == 0 and h.its.process_commands() == 0
    h.its.mmio_write(R.GITS_CWRITER, 8, 0x20)
    assert h.its.creadr == 0x20 and h.its.dump()["collections"] == {1: 1}


# -- GITS_TRANSLATER ---------------------------------------------------------------------------
def test_translater_16_and_32_bit_writes():
    h = Harness()
    h.run(C.encode_mapd(7, itt(7), 16), C.encode_mapc(0, 3),
          C.encode_mapti(7, 0x1234, 9000, 0), C.encode_mapti(7, 0x5678, 9001, 0))
    h.sink.clear()
    h.its.mmio_write(R.GITS_TRANSLATER, 4, 0x1234, devid=7)
    h.its.mmio_write(R.GITS_TRANSLATER, 2, 0xABCD_5678, devid=7)     # low 16 bits only
    h.its.mmio_write(R.GITS_TRANSLATER, 1, 0x34, devid=7)            # not a valid size
    h.its.mmio_write(R.GITS_TRANSLATER, 8, 0x1234, devid=7)
    assert h.sink.calls == [("set_pending", 9000, 3), ("set_pending", 9001, 3)]
    assert h.its.bad_access_count == 2
    assert h.its.mmio_read(R.GITS_TRANSLATER, 4) == 0               # write-only
