"""The one table of ITS command fields (kvmits.its.commands.LAYOUTS) against IHI 0069 5.3, and
everything derived from it: the encoders, decode_command(), and what the model's handlers read."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmits.its import commands as C


def dwords(raw: bytes) -> tuple[int, int, int, int]:
    return struct.unpack("<4Q", raw)


# Expected doublewords written from the command pages of IHI 0069 5.3, not from the code:
# DW0[7:0] command number, DeviceID DW0[63:32], EventID DW1[31:0], pINTID DW1[63:32], Size
# DW1[4:0] (bits - 1), ITT_addr DW2[51:8], V DW2[63], ICID DW2[15:0], RDbase DW2[50:16] (32 bits
# read, as KVM), MOVALL's RDbase1 DW2[50:16] and RDbase2 DW3[50:16].
SPEC_EXAMPLES = [
    (C.encode_mapd(0x1234, 0x4567_8900, 5), (0x0000_1234_0000_0008, 0x4, 0x8000_0000_4567_8900, 0)),
    (C.encode_mapd(7, 0x100, 1, valid=False), (0x0000_0007_0000_0008, 0x0, 0x100, 0)),
    (C.encode_mapc(0x2A, 3), (0x09, 0, 0x8000_0000_0003_002A, 0)),
    (C.encode_mapti(1, 2, 8192, 5), (0x0000_0001_0000_000A, 0x0000_2000_0000_0002, 0x5, 0)),
    (C.encode_mapi(0xFFFF_FFFF, 9, 0xFFFF), (0xFFFF_FFFF_0000_000B, 0x9, 0xFFFF, 0)),
    (C.encode_movi(3, 4, 6), (0x0000_0003_0000_0001, 0x4, 0x6, 0)),
    (C.encode_int(5, 0xABCD), (0x0000_0005_0000_0003, 0xABCD, 0, 0)),
    (C.encode_clear(5, 1), (0x0000_0005_0000_0004, 0x1, 0, 0)),
    (C.encode_inv(5, 1), (0x0000_0005_0000_000C, 0x1, 0, 0)),
    (C.encode_discard(5, 1), (0x0000_0005_0000_000F, 0x1, 0, 0)),
    (C.encode_invall(0x77), (0x0D, 0, 0x77, 0)),
    (C.encode_movall(1, 2), (0x0E, 0, 0x1_0000, 0x2_0000)),
    (C.encode_sync(3), (0x05, 0, 0x3_0000, 0)),
]


@pytest.mark.parametrize("raw, expected", SPEC_EXAMPLES, ids=lambda v: C.command_name(v[0]) if isinstance(v, tuple) else "")
def test_encoders_lay_fields_out_as_the_spec(raw, expected):
    assert dwords(raw) == expected


def test_every_physical_lpi_command_has_one_layout():
    physical = {C.GITS_CMD_MAPD, C.GITS_CMD_MAPC, C.GITS_CMD_MAPTI, C.GITS_CMD_MAPI, C.GITS_CMD_MOVI,
                C.GITS_CMD_INT, C.GITS_CMD_CLEAR, C.GITS_CMD_INV, C.GITS_CMD_DISCARD, C.GITS_CMD_INVALL,
                C.GITS_CMD_MOVALL, C.GITS_CMD_SYNC}
    assert set(C.LAYOUTS) == physical
    spec_names = {"DeviceID", "EventID", "pINTID", "ICID", "RDbase", "RDbase1", "RDbase2", "Size", "ITT_addr", "V"}
    for layout in C.LAYOUTS.values():
        assert {f.name for f in layout.fields} <= spec_names, layout


def test_the_table_refuses_overlapping_fields():
    with pytest.raises(ValueError, match="overlaps"):
        C.Layout(C.GITS_CMD_INT, (C.DEVICE_ID, C.Field("Bad", "bad", 0, 40, 8)))
    with pytest.raises(ValueError, match="overlaps"):          # the command number's byte is taken
        C.Layout(C.GITS_CMD_INT, (C.Field("Bad", "bad", 0, 4, 8),))
    with pytest.raises(ValueError, match="leaves"):
        C.Layout(C.GITS_CMD_INT, (C.Field("Bad", "bad", 3, 60, 8),))


def field_values(layout):
    """Values in range for each field of `layout`, as its key names them."""
    def one(f):
        if f.in_place:
            return st.integers(0, f.mask).map(lambda v: v << f.lsb)
        return st.integers(f.bias, f.mask + f.bias)
    return st.fixed_dictionaries({f.key: one(f) for f in layout.fields})


@pytest.mark.parametrize("number", sorted(C.LAYOUTS), ids=C.command_name)
@given(data=st.data())
def test_what_is_encoded_is_what_decode_and_the_handlers_read(number, data):
    layout = C.LAYOUTS[number]
    values = data.draw(field_values(layout))
    raw = layout.encode(**values)
    dws = dwords(raw)
    assert dws[0] & C.COMMAND_NUMBER_MASK == number
    decoded = C.decode_command(*dws)
    assert decoded.pop("command") == layout.name
    assert decoded == {f.key: bool(values[f.key]) if f.width == 1 else values[f.key] for f in layout.fields}
    assert layout.read(*dws) == tuple(values[f.key] for f in layout.fields)
    seen = []
    layout.bind(lambda *fields: seen.append(fields))(*dws)     # what a model handler is called with
    assert seen == [tuple(values[f.key] for f in layout.fields)]


@given(st.tuples(*(st.integers(0, (1 << 64) - 1) for _ in range(4))))
def test_bits_outside_the_fields_are_ignored(dws):
    for layout in C.LAYOUTS.values():
        values = layout.read(*dws)
        # re-encoding what was read gives the command with every reserved bit clear
        again = dwords(layout.encode(**{f.key: v for f, v in zip(layout.fields, values)}))
        assert layout.read(*again) == values
        for i in range(4):
            assert again[i] & ~dws[i] & ~C.COMMAND_NUMBER_MASK == 0


def test_the_valid_flag_takes_any_truth_value():
    """As the encoders always did: V is set by a true value, whatever it is (2, "yes"), and
    clear for a false one (0, None)."""
    for true in (True, 1, 2, "yes"):
        assert dwords(C.encode_mapd(1, 0x100, 3, true))[2] >> 63 == 1
        assert dwords(C.encode_mapc(1, 2, true))[2] >> 63 == 1
    for false in (False, 0, None):
        assert dwords(C.encode_mapd(1, 0x100, 3, false))[2] >> 63 == 0
        assert dwords(C.encode_mapc(1, 2, false))[2] >> 63 == 0


def test_an_encoder_names_its_fields():
    with pytest.raises(TypeError):
        C.LAYOUTS[C.GITS_CMD_INT].encode(devid=1, eventid=2, icid=3)
