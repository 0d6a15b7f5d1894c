"""ITS command programs: what a guest driver sends, batch by batch, written once and run by the
same guest on either ITS (kvmits.lab.its_lab.ItsLab).

A program is a list of batches; each batch is published by one GITS_CWRITER write. Programs
come from three places: `demo_program` (the mappings `kvmits demo` makes), the differential
check's seeded generator (kvmits.lab.differential.generate_program), or a text file:

    # one command a line, arguments as in the command's fields (IHI 0069 5.3); 0x.. allowed
    MAPD   devid event_bits [valid]     # the guest allocates an ITT for 2**event_bits events
    MAPC   icid vcpu [valid]
    MAPTI  devid eventid intid icid
    MAPI   devid eventid icid
    MOVI   devid eventid icid
    MOVALL from_vcpu to_vcpu
    DISCARD|INT|CLEAR|INV  devid eventid
    INVALL icid
    SYNC   vcpu
    ---                                 # ends a batch (a blank line does too)

The guest has set up the ITS as ItsLab.setup() does (tables, queue, ICID n -> vCPU n) before a
program runs.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmits.its import commands as cmd
from kvmits.its.registers import LPI_BASE

#: a batch longer than this is split: one GITS_CWRITER write per MAX_BATCH commands (the
#: guest's 64 KiB queue holds 2047)
MAX_BATCH = 256


class Op(NamedTuple):
    """One command of a program, as the guest sends it."""

    name: str
    args: tuple

    def encode(self, itt_of) -> bytes:
        """The 32-byte command; `itt_of(devid, event_bits)` gives a MAPD's ITT address."""
        a = self.args
        if self.name == "MAPD":
            devid, bits, valid = a
            # an ITT only for a size the ITS can accept: a refused MAPD needs none
            return cmd.encode_mapd(devid, itt_of(devid, bits) if valid and bits <= 16 else 0, bits, valid)
        if self.name == "MAPC":
            return cmd.encode_mapc(a[0], a[1], a[2])
        return _ENCODERS[self.name](*a)

    def __str__(self) -> str:
        args = list(self.args)
        if self.name in ("MAPD", "MAPC"):
            args[-1] = int(args[-1])
        return " ".join([self.name, *map(str, args)])


_ENCODERS = {
    "MAPTI": cmd.encode_mapti, "MAPI": cmd.encode_mapi, "MOVI": cmd.encode_movi,
    "MOVALL": cmd.encode_movall, "INVALL": cmd.encode_invall, "SYNC": cmd.encode_sync,
    "DISCARD": cmd.encode_discard, "INT": cmd.encode_int, "CLEAR": cmd.encode_clear,
    "INV": cmd.encode_inv,
}

#: name -> (required arguments, optional trailing "valid" flag)
_ARITY = {
    "MAPD": (2, True), "MAPC": (2, True), "MAPTI": (4, False), "MAPI": (3, False),
    "MOVI": (3, False), "MOVALL": (2, False), "DISCARD": (2, False), "INT": (2, False),
    "CLEAR": (2, False), "INV": (2, False), "INVALL": (1, False), "SYNC": (1, False),
}


class ProgramError(ValueError):
    """A program text that cannot be read; says where and why."""


def parse_program(text: str, where: str = "program") -> list[list[Op]]:
    """The batches of a program text (the module's docstring gives the format)."""
    batches: list[list[Op]] = [[]]
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line == "---":
            if batches[-1]:
                batches.append([])
            continue
        name, *fields = line.split()
        name = name.upper()
        if name not in _ARITY:
            raise ProgramError(f"{where}:{lineno}: unknown command {name!r} "
                               f"(known: {', '.join(sorted(_ARITY))})")
        need, has_valid = _ARITY[name]
        if not (len(fields) == need or has_valid and len(fields) == need + 1):
            want = f"{need}{' or ' + str(need + 1) if has_valid else ''}"
            raise ProgramError(f"{where}:{lineno}: {name} takes {want} arguments, got {len(fields)}")
        try:
            values = [int(f, 0) for f in fields]
        except ValueError:
            raise ProgramError(f"{where}:{lineno}: arguments are integers (0x.. for hex): {line!r}") from None
        if any(v < 0 or v >= 1 << 64 for v in values):
            raise ProgramError(f"{where}:{lineno}: an argument is out of 0..2**64-1: {line!r}")
        if has_valid:
            values = values[:need] + [bool(values[need]) if len(values) > need else True]
        batches[-1].append(Op(name, tuple(values)))
    batches = [b[i:i + MAX_BATCH] for b in batches if b for i in range(0, len(b), MAX_BATCH)]
    return batches


def format_program(batches: list[list[Op]]) -> str:
    """The text of a program: parse_program(format_program(p)) == p."""
    return "\n---\n".join("\n".join(str(op) for op in batch) for batch in batches) + "\n"


def demo_program(cpus: int, events: int = 16, devid: int = 0x42) -> list[list[Op]]:
    """The mappings `kvmits demo` makes: one device with an event per LPI spread over the
    vCPUs, then every event moved to the next vCPU."""
    bits = max(1, (events - 1).bit_length())
    return [[Op("MAPD", (devid, bits, True))],
            [Op("MAPTI", (devid, ev, LPI_BASE + ev, ev % cpus)) for ev in range(events)],
            [Op("MOVI", (devid, ev, (ev + 1) % cpus)) for ev in range(events)]]


class ProgramRunner:
    """Runs programs through a lab's guest driver. ITTs are allocated per (device, EventID
    bits) in program order, so two labs running the same program use the same addresses."""

    def __init__(self, lab):
        self.lab = lab
        self.itts: dict[tuple[int, int], int] = {}

    def itt_of(self, devid: int, bits: int) -> int:
        key = (devid, bits)
        if key not in self.itts:
            self.itts[key] = self.lab.heap.alloc(max((1 << bits) * self.lab.its.itt_entry_size, 256), 256)
        return self.itts[key]

    def run(self, batches) -> int:
        """Submit every batch (one GITS_CWRITER write each, waiting for GITS_CREADR); returns the
        number of commands."""
        count = 0
        for batch in batches:
            self.lab.its.submit(*(op.encode(self.itt_of) for op in batch))
            count += len(batch)
        return count
