"""Differential check of the two ITSes: the same random command program, run by the same guest
driver, on the kernel's ITS and on kvmits' userspace ITS; then the final mapping states and the
pending LPIs compared.

Pending state: each program runs with the guest masked (every vCPU's PSTATE.I set), so what its
INT commands make pending stays pending while the rest of the program moves (MOVI, MOVALL, MAPC),
clears (CLEAR, DISCARD) or unmaps it; then the guest unmasks and every LPI still pending is taken,
on the vCPU KVM has it on. The (vCPU, INTID) lists of both ITSes must be equal. While a program
runs, every vCPU but the one the guest driver uses is held out of KVM_RUN (ItsLab.holding), on
both ITSes: the userspace ITS stops every vCPU for its commands anyway, and the kernel's would
otherwise lose a CLEAR now and then (an LPI in a running vCPU's list register keeps its pending
bit when KVM folds the register back at that vCPU's next exit).

Both states are read the same way, the way a VMM migrates an ITS: its tables are saved into
guest memory in the kernel's ABI rev 0 (Documentation/virt/kvm/devices/arm-vgic-its.rst) --
KVM_DEV_ARM_ITS_SAVE_TABLES on one side, ItsModel.save_tables() on the other -- and decoded by
kvmits.its.abi. Equal states mean the same devices, ITT addresses and sizes, events -> (LPI,
collection), collection targets, and collections known without a target.

What the saved tables cannot show, and how the check still sees it: an ITE whose collection
MAPC V=0 unmapped (an *orphan*) still exists in both ITSes -- it never translates, MOVI and
DISCARD fail on it, a MAPTI of its EventID changes nothing -- but the kernel saves it as an
invalid entry (vgic_its_save_ite with a NULL collection), so it is invisible in the tables.
After the program, both ITSes get the same *probe*: a MAPTI of every EventID the model holds an
orphan for. An ITS that has the orphan ignores it; one that does not gains an ITE, which the
tables show. So orphans are compared too, through behaviour.

Programs are seeded and reproducible: `generate_program(seed)` is the whole program. It maps
devices (one of them with EventIDs in the LPI range, for MAPI) and collections first, then
mostly valid commands on the mapped state, chosen from a shadow of what the program mapped;
about one command in six is invalid in one field (DeviceID past the table, an unmapped
device, EventID past the ITT, an LPI number below 8192 or past GICR_PROPBASER.IDbits, a
collection past the table or not mapped, a vCPU that does not exist, no ITE for the event,
an ITT size past GITS_TYPER.ID_bits), so the error handling is compared too.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from kvmits.its.registers import LPI_BASE
from kvmits.lab.its_program import Op, ProgramRunner

#: commands per program (plus the orphan probe): 200 programs (both ITSes, resets included)
#: took 127 s in the arm64 testbed (qemu TCG, idle host), 1000 about 15 minutes
LENGTH = 40
# Ranges of the generated programs: small, so commands collide on the same devices/events/LPIs.
DEVICES = 6
EVENT_BITS = (2, 3, 4, 5)
#: a device with this many EventID bits has EventIDs that are LPI numbers: MAPI can succeed
WIDE_BITS = 14
COLLECTIONS = 6
LPIS = 96
#: share of the commands after the set-up generated invalid: with the (valid) set-up, about one
#: command in six of a program fails
INVALID_SHARE = 0.19
#: the probe of an orphaned ITE maps this LPI (any valid one does)
PROBE_LPI = LPI_BASE


class _Shadow:
    """What the program has mapped so far, as KVM's ITS would have it: only used to choose
    arguments, so approximations cost validity, never correctness."""

    def __init__(self, cpus: int):
        self.devices: dict[int, int] = {}                   # devid -> EventID bits
        self.collections: dict[int, int] = {c: c for c in range(cpus)}     # ItsLab's set-up
        self.ites: dict[tuple[int, int], int] = {}          # (devid, eventid) -> ICID
        self.orphans: set[tuple[int, int]] = set()          # ITEs whose collection was unmapped

    def live(self) -> list[tuple[int, int]]:
        """ITEs whose collection is mapped: what MOVI, DISCARD and INT accept."""
        return sorted(k for k, icid in self.ites.items() if icid in self.collections)

    def free_events(self, devid: int) -> list[int]:
        bits = self.devices[devid]
        taken = {e for d, e in list(self.ites) + list(self.orphans) if d == devid}
        first = LPI_BASE if bits >= WIDE_BITS else 0
        return [e for e in range(first, min(1 << bits, first + 32)) if e not in taken]

    # -- effects of valid commands ---------------------------------------------------------
    def mapd(self, devid: int, bits: int, valid: bool) -> None:
        for key in [k for k in list(self.ites) + list(self.orphans) if k[0] == devid]:
            self.ites.pop(key, None)
            self.orphans.discard(key)
        if valid:
            self.devices[devid] = bits
        else:
            self.devices.pop(devid, None)

    def mapc(self, icid: int, cpu: int, valid: bool) -> None:
        if valid:
            self.collections[icid] = cpu
            return
        self.collections.pop(icid, None)
        for key in [k for k, i in self.ites.items() if i == icid]:
            del self.ites[key]
            self.orphans.add(key)


def generate_program(seed: int, length: int = LENGTH, cpus: int = 4) -> list[list[Op]]:
    """A reproducible program of `length` commands: a list of batches, each published by one
    GITS_CWRITER write. Assumes the ITS set up as ItsLab does (collection n -> vCPU n)."""
    rng = random.Random(seed)
    s = _Shadow(cpus)
    ops: list[Op] = []

    def lpi() -> int:
        return LPI_BASE + rng.randrange(LPIS)

    def mapped_icid() -> int:
        return rng.choice(sorted(s.collections)) if s.collections else 0

    # -- valid commands --------------------------------------------------------------------
    def mapd() -> Op:
        devid = rng.randrange(DEVICES)
        valid = not (devid in s.devices and rng.random() < 0.25)
        bits = WIDE_BITS if devid == DEVICES - 1 and rng.random() < 0.5 else rng.choice(EVENT_BITS)
        s.mapd(devid, bits, valid)
        return Op("MAPD", (devid, bits, valid))

    def mapc() -> Op:
        r = rng.random()
        if r < 0.15 and len(s.collections) > 2:
            icid = rng.choice(sorted(s.collections))
            s.mapc(icid, 0, False)
            return Op("MAPC", (icid, rng.randrange(cpus), False))   # RDbase is checked for V=0 too
        icid = rng.randrange(COLLECTIONS)
        cpu = rng.randrange(cpus)
        s.mapc(icid, cpu, True)
        return Op("MAPC", (icid, cpu, True))

    def mapti() -> Op:
        devs = [d for d in sorted(s.devices) if s.free_events(d)]
        if not devs:
            return mapd()
        devid = rng.choice(devs)
        eventid = rng.choice(s.free_events(devid))
        # now and then a collection MAPC has not mapped yet: KVM keeps it without a target
        icid = mapped_icid() if rng.random() < 0.9 else rng.randrange(COLLECTIONS + 2)
        s.ites[(devid, eventid)] = icid
        if eventid >= LPI_BASE and rng.random() < 0.5:
            return Op("MAPI", (devid, eventid, icid))
        return Op("MAPTI", (devid, eventid, lpi(), icid))

    def on_live(name: str):
        def make() -> Op:
            live = s.live()
            if not live:
                return mapti()
            devid, eventid = rng.choice(live)
            if name == "MOVI":
                icid = mapped_icid()
                s.ites[(devid, eventid)] = icid
                return Op("MOVI", (devid, eventid, icid))
            if name == "DISCARD":
                del s.ites[(devid, eventid)]
            return Op(name, (devid, eventid))
        return make

    valid_makers = [
        (2, mapd), (2, mapc), (8, mapti), (3, on_live("MOVI")), (2, on_live("DISCARD")),
        (3, on_live("INT")), (1, on_live("CLEAR")), (1, on_live("INV")),
        (1, lambda: Op("INVALL", (mapped_icid(),))),
        (1, lambda: Op("MOVALL", (rng.randrange(cpus), rng.randrange(cpus)))),
        (1, lambda: Op("SYNC", (rng.randrange(cpus),))),
    ]

    # -- invalid commands: one field out of range, or naming what is not mapped --------------
    def bad_devid() -> int:
        unmapped = [d for d in range(DEVICES + 2) if d not in s.devices]
        if unmapped and rng.random() < 0.5:
            return rng.choice(unmapped)
        return rng.choice((1 << 16, 0xFFFF_FFFF, 8192))

    def some_event() -> tuple[int, int]:
        if s.devices:
            devid = rng.choice(sorted(s.devices))
            return devid, rng.randrange(1 << min(s.devices[devid], 5))
        return bad_devid(), 0

    def bad_event() -> tuple[int, int]:
        devid, _ = some_event()
        bits = s.devices.get(devid, 0)
        return devid, rng.choice(((1 << bits) + rng.randrange(4), 1 << 16, 0xFFFF_FFFF))

    def no_ite() -> tuple[int, int]:
        for _ in range(8):
            key = some_event()
            if key not in s.ites:
                return key
        return bad_event()

    def bad_icid() -> int:
        return rng.choice((8192, 0xFFFF))

    def unmapped_icid() -> int:
        return rng.choice([i for i in range(COLLECTIONS + 2) if i not in s.collections])

    def bad_cpu() -> int:
        return cpus + rng.randrange(4)

    def ite_or_orphan() -> tuple[int, int]:
        if s.orphans and rng.random() < 0.5:
            return rng.choice(sorted(s.orphans))
        return no_ite()

    invalid_makers = [
        lambda: Op("MAPTI", (bad_devid(), 0, lpi(), mapped_icid())),
        lambda: Op("MAPTI", (*bad_event(), lpi(), mapped_icid())),
        lambda: Op("MAPTI", (*some_event(), rng.choice((0, 31, 1023, 8191, 1 << 16, 0xFFFF_FFFF)),
                             mapped_icid())),
        lambda: Op("MAPTI", (*some_event(), lpi(), bad_icid())),
        lambda: Op("MAPI", (*some_event(), mapped_icid())),           # EventID < 8192: no LPI
        lambda: Op("MAPC", (rng.randrange(COLLECTIONS), bad_cpu(), rng.random() < 0.7)),
        lambda: Op("MAPC", (bad_icid(), rng.randrange(cpus), True)),
        lambda: Op("MAPD", (rng.choice((1 << 16, 0xFFFF_FFFF, 8192)), 3, True)),
        lambda: Op("MAPD", (rng.randrange(DEVICES), rng.randrange(17, 33), True)),
        lambda: Op(rng.choice(("DISCARD", "INT", "CLEAR", "INV")), ite_or_orphan()),
        lambda: Op("MOVI", (*ite_or_orphan(), mapped_icid())),
        lambda: Op("MOVI", (*(rng.choice(s.live()) if s.live() else no_ite()), unmapped_icid())),
        lambda: Op(rng.choice(("DISCARD", "INT")), (bad_devid(), rng.randrange(32))),
        lambda: Op("INVALL", (unmapped_icid(),)),
        lambda: Op("MOVALL", (bad_cpu(), rng.randrange(cpus))),
    ]

    # the set-up: devices and collections mapped first
    for devid in rng.sample(range(DEVICES), rng.randint(3, 5)):
        bits = WIDE_BITS if devid == DEVICES - 1 else rng.choice(EVENT_BITS)
        s.mapd(devid, bits, True)
        ops.append(Op("MAPD", (devid, bits, True)))
    for icid in range(cpus, COLLECTIONS):
        if rng.random() < 0.7:
            cpu = rng.randrange(cpus)
            s.mapc(icid, cpu, True)
            ops.append(Op("MAPC", (icid, cpu, True)))
    weights = [w for w, _ in valid_makers]
    while len(ops) < length:
        if rng.random() < INVALID_SHARE:
            op = rng.choice(invalid_makers)()
        else:
            op = rng.choices(valid_makers, weights)[0][1]()
        ops.append(op)
    ops = ops[:length]
    batches, i = [], 0
    while i < len(ops):
        n = rng.randint(1, 6)
        batches.append(ops[i:i + n])
        i += n
    return batches


def probe_ops(orphans) -> list[Op]:
    """The orphan probe: a MAPTI of each (DeviceID, EventID). Ignored by an ITS that holds an
    ITE there (MAPTI over an existing ITE: UNPREDICTABLE; KVM keeps the old one), an ITE in
    the saved tables of one that does not."""
    return [Op("MAPTI", (devid, eventid, PROBE_LPI, 0)) for devid, eventid in orphans]


class ProgramResult(NamedTuple):
    seed: int
    #: (vCPU, INTID) of every LPI pending at the end of the program, which ran with the guest
    #: masked: taken once the guest unmasked (ItsLab.unmask)
    pending: list
    #: canonical dump of the saved tables, plus "untargeted": the ICIDs of collections known
    #: without a target (saved with RDBase = COLLECTION_NOT_MAPPED)
    dump: dict
    commands: int
    #: (DeviceID, EventID) of the orphaned ITEs before the probe: the userspace ITS's (its
    #: model knows them), None for the kernel's
    orphans: tuple | None


def run_program(lab, seed: int, length: int = LENGTH, probe=None, migrate_to: str | None = None) -> ProgramResult:
    """Reset the lab's ITS, set it up again, run program `seed`, probe orphans and return the
    final state. `probe`: the (DeviceID, EventID) pairs to probe; None: the lab's own orphans
    (a userspace ITS knows them; the kernel's none). `migrate_to`: migrate the guest halfway
    through the program's batches (masked, LPIs pending) into a VM with this ITS kind
    (ItsLab.migrate) and finish the program there; the lab keeps the new VM."""
    lab.reset_its()
    runner = ProgramRunner(lab)
    batches = generate_program(seed, length, lab.cpus)
    halves = [batches] if migrate_to is None else [batches[:len(batches) // 2], batches[len(batches) // 2:]]
    lab.mask()
    count = 0
    try:
        for n, half in enumerate(halves):
            if n:
                lab.migrate(migrate_to)
            # no vCPU but the driver's runs guest code while the commands run, as with the userspace
            # ITS: the kernel's ITS otherwise loses a CLEAR of an LPI in a running vCPU's list
            # register now and then (ItsLab.holding), a race no model can match
            with lab.holding():
                count += runner.run(half)
    finally:
        pending = lab.unmask()
    orphans = lab.orphaned_ites()
    probe = (orphans or ()) if probe is None else probe
    if probe:
        count += runner.run([probe_ops(probe)])
    content = lab.its_tables()
    return ProgramResult(seed, pending, dict(content.dump, untargeted=list(content.unmapped_collections)),
                         count, orphans)


def run_pair(kernel_lab, user_lab, seed: int, length: int = LENGTH) -> tuple[ProgramResult, ProgramResult]:
    """Program `seed` on both labs, the userspace ITS first (its orphans make the probe)."""
    user = run_program(user_lab, seed, length)
    kernel = run_program(kernel_lab, seed, length, probe=user.orphans or ())
    return kernel, user


def compare_pending(kernel: list, user: list) -> list[str]:
    """Differences between two programs' pending LPIs ((vCPU, INTID) lists), by LPI."""
    diffs = []
    for intid in sorted({i for _, i in kernel} | {i for _, i in user}):
        k = [c for c, i in kernel if i == intid]
        u = [c for c, i in user if i == intid]
        if k != u:
            diffs.append(f"LPI {intid} pending on vCPU(s): kernel {k}, user {u}")
    return diffs


def compare(kernel: dict, user: dict, orphans=()) -> list[str]:
    """Human-readable differences between two states (empty: the same). `orphans`: the
    (DeviceID, EventID) pairs the probe tested, to say so next to their differences."""
    diffs = []
    a, b = kernel["collections"], user["collections"]
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diffs.append(f"collection {key}: kernel {a.get(key)}, user {b.get(key)}")
    if "untargeted" in kernel and "untargeted" in user and kernel["untargeted"] != user["untargeted"]:
        diffs.append(f"collections without a target: kernel {kernel['untargeted']}, user {user['untargeted']}")
    probed = set(orphans or ())
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
                note = " (an orphaned ITE in the model: the probe MAPTI took on the kernel)" \
                    if (devid, ev) in probed else ""
                diffs.append(f"device {devid:#x} event {ev}: kernel {ea.get(ev)}, user {eb.get(ev)}{note}")
    return diffs
