"""MSI-X: capability, table, PBA, masking and replay (PCI 3.0, 6.8.2), on the host."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmits.machine.pci import Bar, ConfigSpace
from kvmits.machine.pci import msix as M
from kvmits.machine.pci.config import PCI_CAP_ID_MSIX
from tests.machine.pci_fakes import RecordingMsixSink as Sink

TABLE, PBA = 0x0, 0x800
DOORBELL = 0x0809_0040


def make(vectors=4):
    config = ConfigSpace(0x1AF4, 0x1042, 0x010000, bars=(Bar(1, 0x1000),))
    sink = Sink()
    return config, M.Msix(config, vectors, 1, TABLE, PBA, sink), sink


def program(msix, vector, address=DOORBELL, data=None):
    base = TABLE + vector * M.PCI_MSIX_ENTRY_SIZE
    msix.bar_write(base, 8, address)                  # a QWORD write of both address words
    msix.bar_write(base + M.PCI_MSIX_ENTRY_DATA, 4, vector + 100 if data is None else data)


def unmask(msix, vector, masked=False):
    msix.bar_write(TABLE + vector * M.PCI_MSIX_ENTRY_SIZE + M.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, int(masked))


def enable(config, msix, function_mask=False):
    config.write(msix.cap + M.PCI_MSIX_FLAGS, 2, M.PCI_MSIX_FLAGS_ENABLE | (M.PCI_MSIX_FLAGS_MASKALL if function_mask else 0))


def test_the_capability_says_where_the_table_and_pba_are():
    config, msix, _ = make(vectors=5)
    assert (msix.cap, PCI_CAP_ID_MSIX) in config.capabilities()
    assert config.read(msix.cap + M.PCI_MSIX_FLAGS, 2) == 4                     # N - 1
    assert config.read(msix.cap + M.PCI_MSIX_TABLE, 4) == TABLE | 1
    assert config.read(msix.cap + M.PCI_MSIX_PBA, 4) == PBA | 1
    config.write(msix.cap + M.PCI_MSIX_FLAGS, 2, 0xFFFF)                        # size is read-only
    assert config.read(msix.cap + M.PCI_MSIX_FLAGS, 2) == 4 | M.PCI_MSIX_FLAGS_ENABLE | M.PCI_MSIX_FLAGS_MASKALL
    config.write(msix.cap + M.PCI_MSIX_TABLE, 4, 0x100)
    assert config.read(msix.cap + M.PCI_MSIX_TABLE, 4) == TABLE | 1
    assert all(msix.masked(v) for v in range(5))                               # 6.8.2.9: masked at reset


def test_a_vector_fires_only_when_enabled_and_unmasked_and_pending_ones_replay():
    config, msix, sink = make()
    program(msix, 2)
    assert not msix.signal(2) and msix.is_pending(2)                           # MSI-X not enabled
    assert msix.bar_read(PBA, 8) == 1 << 2
    enable(config, msix)
    assert sink.calls == [] and msix.is_pending(2)                             # still masked
    unmask(msix, 2)
    assert sink.calls == [("route", 2, DOORBELL, 102), ("fire", 2)] and not msix.is_pending(2)
    sink.calls.clear()
    assert msix.signal(2) and sink.calls == [("fire", 2)]
    sink.calls.clear()
    enable(config, msix, function_mask=True)                                   # Function Mask
    assert not msix.signal(2) and sink.calls == []
    enable(config, msix)
    assert sink.calls == [("route", 2, DOORBELL, 102), ("fire", 2)]
    assert (msix.latched, msix.replayed) == (2, 2)


def test_a_new_message_is_routed_before_the_vector_fires_again():
    config, msix, sink = make()
    enable(config, msix)
    program(msix, 0)
    unmask(msix, 0)
    sink.calls.clear()
    msix.bar_write(TABLE + M.PCI_MSIX_ENTRY_DATA, 4, 7)                        # new data, unmasked
    assert sink.calls == [("route", 0, DOORBELL, 7)]
    assert msix.message(0) == (DOORBELL, 7)


def test_reserved_bits_pba_writes_and_odd_accesses():
    config, msix, sink = make()
    ctrl = TABLE + M.PCI_MSIX_ENTRY_VECTOR_CTRL
    msix.bar_write(ctrl, 4, 0xFFFF_FFFE)                                       # only bit 0 exists
    assert msix.bar_read(ctrl, 4) == 0
    msix.signal(3)
    msix.bar_write(PBA, 8, 0)                                                  # the PBA is read-only
    assert msix.is_pending(3)
    assert msix.bar_read(TABLE + 1, 2) == 0 and msix.bar_read(0xF00, 4) == 0   # unaligned; outside both
    assert msix.claims(TABLE) and msix.claims(PBA) and not msix.claims(0xF00)
    assert not msix.signal(4) and not msix.signal(-1)                         # no such vector


def test_bad_layouts_are_refused():
    config = ConfigSpace(1, 2, 3, bars=(Bar(1, 0x1000),))
    with pytest.raises(ValueError, match="BAR 0"):
        M.Msix(config, 4, 0, TABLE, PBA, Sink())
    with pytest.raises(ValueError, match="after the table"):
        M.Msix(config, 200, 1, TABLE, PBA, Sink())
    with pytest.raises(ValueError, match="do not fit"):
        M.Msix(config, 65, 1, TABLE, 0xFF8, Sink())             # a 16-byte PBA from 0xFF8
    with pytest.raises(ValueError):
        M.Msix(config, 0, 1, TABLE, PBA, Sink())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("bar"), st.integers(0, 0x900), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("ctl"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("signal"), st.integers(-2, 6))), max_size=50))
def test_every_signal_is_sent_once_or_pending_and_never_fires_masked(ops):
    """Whatever the guest writes: a signal is fired at once, or latched; a fire happens only
    for a vector that is unmasked with MSI-X live, after its route; nothing raises."""
    config, msix, sink = make()
    raised = 0
    for op in ops:
        before = len(sink.calls)
        if op[0] == "bar":
            msix.bar_write(op[1], op[2], op[3] & ((1 << (8 * op[2])) - 1))
            msix.bar_read(op[1], op[2])
        elif op[0] == "ctl":
            config.write(msix.cap + M.PCI_MSIX_FLAGS, 2, op[1])
        else:
            raised += 0 <= op[1] < 4
            msix.signal(op[1])
        for call in sink.calls[before:]:          # what this operation sent, in the state it left
            if call[0] == "fire":
                assert msix.enabled and not msix.control & M.PCI_MSIX_FLAGS_MASKALL and not msix.masked(call[1])
        routed = set()
        for call in sink.calls:
            if call[0] == "route":
                routed.add(call[1])
            else:
                assert call[1] in routed
    # each signal fired at once or was latched; each replay fired one latched (merged) signal
    fired = sum(c[0] == "fire" for c in sink.calls)
    assert fired - msix.replayed + msix.latched == raised
    assert msix.replayed <= msix.latched
