"""Differential check of the two ITSes: the same random command program, run by the same guest
driver, on the kernel's ITS and on kvmits' userspace ITS; then the final mapping states compared.

The kernel's state is read the way a VMM migrates it: KVM_DEV_ARM_ITS_SAVE_TABLES writes the
device, collection and interrupt translation tables into guest memory (ABI rev 0,
Documentation/virt/kvm/devices/arm-vgic-its.rst) and kvmits.its.abi decodes them; the model's
comes from ItsModel.dump(). Both are canonical dumps (kvmits.its.abi.canonical_dump): equal
dumps mean the same devices, ITT addresses and sizes, events -> (LPI, collection), and
collection targets.

Programs are seeded and reproducible: `generate_program(seed)` is the whole program. Most
commands are valid; about one in six has a field out of range (DeviceID past the device table,
EventID past the device's ITT, an LPI number below 8192 or past GICR_PROPBASER.IDbits, a
collection past the collection table or targeting a vCPU that does not exist), so the error
handling is compared too.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from kvmits.its import commands as cmd

LPI_BASE = 8192

# Ranges of the generated programs: small, so commands collide on the same devices/events/LPIs.
DEVICES = 6
EVENT_BITS = (1, 2, 3, 4, 5)
COLLECTIONS = 6
LPIS = 96


class Op(NamedTuple):
    """One command of a program, as the guest sends it."""

    name: str
    args: tuple

    def encode(self, itt_of) -> bytes:
        a = self.args
        if self.name == "MAPD":
            devid, bits, valid = a
            return cmd.encode_mapd(devid, itt_of(devid, bits) if valid else 0, bits, valid)
        if self.name == "MAPC":
            return cmd.encode_mapc(a[0], a[1], a[2])
        if self.name == "MAPTI":
            return cmd.encode_mapti(*a)
        if self.name == "MAPI":
            return cmd.encode_mapi(*a)
        if self.name == "MOVI":
            return cmd.encode_movi(*a)
        if self.name == "MOVALL":
            return cmd.encode_movall(*a)
        if self.name == "INVALL":
            return cmd.encode_invall(*a)
        if self.name == "SYNC":
            return cmd.encode_sync(*a)
        return {"DISCARD": cmd.encode_discard, "INT": cmd.encode_int, "CLEAR": cmd.encode_clear,
                "INV": cmd.encode_inv}[self.name](*a)


def generate_program(seed: int, length: int = 40, cpus: int = 4) -> list[list[Op]]:
    """A reproducible program: a list of batches, each published by one GITS_CWRITER write."""
    rng = random.Random(seed)

    def devid():
        return rng.randrange(DEVICES) if rng.random() > 0.05 else rng.choice((1 << 16, 0xFFFFFFFF))

    def eventid():
        return rng.randrange(32) if rng.random() > 0.05 else rng.choice((1 << 16, 0xFFFFFFFF))

    def icid():
        return rng.randrange(COLLECTIONS) if rng.random() > 0.05 else rng.choice((8192, 0xFFFF))

    def intid():
        if rng.random() > 0.05:
            return LPI_BASE + rng.randrange(LPIS)
        return rng.choice((0, 31, 1023, 8191, 1 << 16, 0xFFFFFFFF))

    def cpu():
        return rng.randrange(cpus) if rng.random() > 0.05 else cpus + rng.randrange(4)

    makers = [
        (3, lambda: Op("MAPD", (devid(), rng.choice(EVENT_BITS), rng.random() > 0.15))),
        (2, lambda: Op("MAPC", (icid(), cpu(), rng.random() > 0.1))),
        (6, lambda: Op("MAPTI", (devid(), eventid(), intid(), icid()))),
        (1, lambda: Op("MAPI", (devid(), eventid(), icid()))),
        (2, lambda: Op("MOVI", (devid(), eventid(), icid()))),
        (2, lambda: Op("DISCARD", (devid(), eventid()))),
        (1, lambda: Op("INT", (devid(), eventid()))),
        (1, lambda: Op("CLEAR", (devid(), eventid()))),
        (1, lambda: Op("INV", (devid(), eventid()))),
        (1, lambda: Op("INVALL", (icid(),))),
        (1, lambda: Op("MOVALL", (cpu(), cpu()))),
        (1, lambda: Op("SYNC", (cpu(),))),
    ]
    weights = [w for w, _ in makers]
    ops = [rng.choices(makers, weights)[0][1]() for _ in range(length)]
    batches, i = [], 0
    while i < len(ops):
        n = rng.randint(1, 4)
        batches.append(ops[i:i + n])
        i += n
    return batches


class ProgramResult(NamedTuple):
    seed: int
    dump: dict
    commands: int


def run_program(lab, seed: int, length: int = 40) -> ProgramResult:
    """Reset the lab's ITS, set it up again, run program `seed` and return the final state."""
    lab.reset_its()
    itts: dict[tuple[int, int], int] = {}

    def itt_of(devid: int, bits: int) -> int:
        # one ITT per (device, size), allocated in program order: the same addresses in both modes
        key = (devid, bits)
        if key not in itts:
            itts[key] = lab.heap.alloc(max((1 << bits) * lab.its.itt_entry_size, 256), 256)
        return itts[key]

    count = 0
    for batch in generate_program(seed, length, lab.cpus):
        lab.its.submit(*(op.encode(itt_of) for op in batch))
        count += len(batch)
    return ProgramResult(seed, lab.its_state(), count)


def compare(kernel: dict, user: dict) -> list[str]:
    """Human-readable differences between two canonical dumps (empty: the same)."""
    diffs = []
    for name in ("collections",):
        a, b = kernel[name], user[name]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"collection {key}: kernel {a.get(key)}, user {b.get(key)}")
    ka, kb = kernel["devices"], user["devices"]
    for devid in sorted(set(ka) | set(kb)):
        da, db = ka.get(devid), kb.get(devid)
        if da is None or db is None:
            diffs.append(f"device {devid:#x}: kernel {'mapped' if da else 'unmapped'}, "
                         f"user {'mapped' if db else 'unmapped'}")
            continue
        for field in ("itt_addr", "size_bits"):
            if da[field] != db[field]:
                diffs.append(f"device {devid:#x} {field}: kernel {da[field]:#x}, user {db[field]:#x}")
        ea, eb = da["events"], db["events"]
        for ev in sorted(set(ea) | set(eb)):
            if ea.get(ev) != eb.get(ev):
                diffs.append(f"device {devid:#x} event {ev}: kernel {ea.get(ev)}, user {eb.get(ev)}")
    return diffs
