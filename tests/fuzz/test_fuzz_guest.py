"""The guest-side fuzzer's streams (kvmits.fuzz.guest): deterministic per seed, and never an
address the guest's own memory could be hit through. The streams against a real ITS run in
tests/arm64/test_guest_fuzz.py."""

import pytest

from kvmits.fuzz import guest as gf
from kvmits.its import commands as cmd
from kvmits.its.commands import GITS_CMD_MAPD
from kvmits.its.registers import ITS_FRAME_SIZE
from kvmits.machine.memmap import RAM_BASE

ARENA = gf.Arena.of()
SEEDS = range(1, 1501)


def safe(addr: int) -> bool:
    """In the arena's programmable span, or no RAM at all."""
    return ARENA.base <= addr < ARENA.base + gf.ARENA_SPAN or not RAM_BASE <= addr < ARENA.ram_end


def register_addresses(value: int):
    """Every address a GITS_CBASER or GITS_BASER<n> value can name, whatever its page size
    (IHI 0069 12.19: [51:12]; 64 KiB pages: [47:16] with PA[51:48] in [15:12])."""
    yield value & ((1 << 52) - 1) & ~0xFFF
    yield value & ((1 << 48) - 1) & ~0x3FFF
    yield (value & ((1 << 48) - 1) & ~0xFFFF) | ((value >> 12) & 0xF) << 48


def all_ops():
    for seed in SEEDS:
        yield from gf.make_stream(seed, ARENA)


def test_a_stream_is_a_function_of_its_seed():
    assert gf.make_stream(7, ARENA) == gf.make_stream(7, ARENA)
    assert gf.make_stream(7, ARENA) != gf.make_stream(8, ARENA)


def test_streams_cover_every_kind_of_operation():
    kinds = {op[0] for op in all_ops()}
    assert kinds == {"read", "write", "program", "commands", "msi", "poke", "save"}


def test_accesses_stay_in_the_its_frames_with_every_width():
    widths = set()
    for op in all_ops():
        if op[0] in ("read", "write"):
            assert 0 <= op[1] < ITS_FRAME_SIZE and op[2] in (1, 2, 4, 8)
            widths.add(op[2])
    assert widths == {1, 2, 4, 8}


def test_address_registers_are_written_whole_with_safe_values():
    halves = []
    for op in all_ops():
        if op[0] == "program":
            assert all(safe(a) for a in register_addresses(op[2])), op
        elif op[0] == "write" and gf._in(op[1], gf.ADDRESS_REGISTERS):
            offset, width, value = op[1:]
            assert width in (4, 8) and offset % width == 0, op
            if width == 8:
                assert all(safe(a) for a in register_addresses(value)), op
            else:
                halves.append((offset % 8, value))
    # a 32-bit half combines with whatever the other half holds: every low half with a zero
    # high half is safe, and a non-zero high half is beyond RAM (RAM is below 4 GiB)
    assert ARENA.ram_end <= 1 << 32
    assert halves and all(safe(a) for half, v in halves if half == 0 for a in register_addresses(v))


def test_commands_name_only_safe_addresses():
    mapds = 0
    for op in all_ops():
        if op[0] != "commands":
            continue
        for raw in op[1]:
            dw0, dw1, dw2, dw3 = cmd.COMMAND.unpack(raw)
            # DW2 bits [51:8] are MAPD's ITT_addr: whatever the command number says, they are safe
            assert safe(dw2 & ((1 << 52) - 1) & ~0xFF), raw.hex()
            mapds += (dw0 & 0xFF) == GITS_CMD_MAPD
    assert mapds > 100


def test_pokes_are_in_the_arena_and_safe_as_any_entry():
    pokes = [op for op in all_ops() if op[0] == "poke"]
    assert pokes
    for _, gpa, value in pokes:
        assert ARENA.contains(gpa, 8) and gpa % 8 == 0
        assert safe(value & ((1 << 52) - 1) & ~0xFF)       # an ITT_addr, a level-1 entry's page


def test_the_check_uses_ids_no_stream_maps():
    for op in all_ops():
        if op[0] == "commands":
            for raw in op[1]:
                fields = cmd.decode_command(*cmd.COMMAND.unpack(raw))
                assert fields.get("intid") != gf.CHECK_LPI
                if fields["command"] in ("MAPD", "MAPTI", "MAPI"):
                    assert fields["devid"] != gf.CHECK_DEVID
                if fields["command"] == "MAPC":
                    assert fields["icid"] != gf.CHECK_ICID


def test_show_prints_a_stream(capsys):
    assert gf.main(["--show", "42"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(gf.make_stream(42, ARENA))


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        gf.main(["--streams", "0"])
