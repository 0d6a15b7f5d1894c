"""ITS command programs: the text format, its errors, the demo program and ProgramRunner's ITT
allocation (the programs run on real ITSes in tests/arm64/test_its_query.py)."""

from __future__ import annotations

import pytest

from kvmits.its import commands as C
from kvmits.lab.differential import generate_program
from kvmits.lab.its_program import (
    MAX_BATCH, Op, ProgramError, ProgramRunner, demo_program, format_program, parse_program,
)

TEXT = """\
# a device, two events, a move
MAPD 0x42 4
mapc 5 3 1          # lower case and an explicit valid flag
MAPTI 0x42 0 8192 5
---
MAPI 0x42 8200 1
MOVI 0x42 0 2

DISCARD 66 1
MAPD 0x42 4 0
SYNC 3
"""


def test_the_text_format():
    assert parse_program(TEXT) == [
        [Op("MAPD", (0x42, 4, True)), Op("MAPC", (5, 3, True)), Op("MAPTI", (0x42, 0, 8192, 5))],
        [Op("MAPI", (0x42, 8200, 1)), Op("MOVI", (0x42, 0, 2))],
        [Op("DISCARD", (66, 1)), Op("MAPD", (0x42, 4, False)), Op("SYNC", (3,))],
    ]


@pytest.mark.parametrize("text, message", [
    ("MAPX 1 2", "p.its:1: unknown command 'MAPX'"),
    ("\nMAPTI 1 2 3", "p.its:2: MAPTI takes 4 arguments, got 3"),
    ("MAPD 1", "MAPD takes 2 or 3 arguments, got 1"),
    ("MOVI 1 two 3", "arguments are integers"),
    ("INT -1 0", "out of 0..2**64-1"),
    ("SYNC 0x10000000000000000", "out of 0..2**64-1"),
])
def test_errors_say_where_and_why(text, message):
    with pytest.raises(ProgramError, match=message.replace("*", r"\*").replace(".", r"\.")
                       .replace("(", r"\(").replace(")", r"\)")):
        parse_program(text, "p.its")


def test_long_batches_are_split():
    text = "\n".join(f"INT 1 {n}" for n in range(MAX_BATCH + 3))
    assert [len(b) for b in parse_program(text)] == [MAX_BATCH, 3]


@pytest.mark.parametrize("seed", range(1, 30))
def test_format_round_trips_generated_programs(seed):
    program = generate_program(seed)
    assert parse_program(format_program(program)) == program


def test_demo_program():
    program = demo_program(cpus=3, events=5)
    assert program[0] == [Op("MAPD", (0x42, 3, True))]
    assert program[1][4] == Op("MAPTI", (0x42, 4, 8196, 1))
    assert program[2][4] == Op("MOVI", (0x42, 4, 2))


class FakeHeap:
    def __init__(self):
        self.next = 0x1000_0000
        self.calls = []

    def alloc(self, size, align):
        self.calls.append((size, align))
        addr = self.next
        self.next += size
        return addr


class FakeIts:
    itt_entry_size = 8

    def __init__(self):
        self.submitted = []

    def submit(self, *commands):
        self.submitted.append(commands)


class FakeLab:
    def __init__(self):
        self.heap = FakeHeap()
        self.its = FakeIts()


def test_runner_submits_a_batch_per_cwriter_write_and_reuses_itts():
    lab = FakeLab()
    runner = ProgramRunner(lab)
    program = parse_program("MAPD 1 4\nMAPD 2 1\n---\nMAPD 1 4 0\nMAPD 1 4\nMAPD 1 6\n")
    assert runner.run(program) == 5
    assert [len(b) for b in lab.its.submitted] == [2, 3]
    # (1, 4) allocated once and reused; the ITT is at least 256 bytes (KVM's ITT alignment)
    assert lab.heap.calls == [(256, 256), (256, 256), (512, 256)]
    first, again = lab.its.submitted[0][0], lab.its.submitted[1][1]
    assert first == again == C.encode_mapd(1, 0x1000_0000, 4)
    assert lab.its.submitted[1][0] == C.encode_mapd(1, 0, 4, valid=False)    # V=0 needs no ITT
