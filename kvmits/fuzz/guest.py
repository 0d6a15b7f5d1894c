"""The guest-side ITS fuzzer: seeded random streams of GITS_* register traffic, command queues
and table memory, performed by the guest agent's vCPU against either ITS under KVM (the kernel's
vgic-its, or kvmits' userspace model), with the machine's health checked after every stream.

    python -m kvmits.fuzz.guest --its kernel,user --streams 10000 --seed 1
    python -m kvmits.fuzz.guest --show 1234          # what stream 1234 does

Against the kernel's ITS it is a kernel fuzzer: every access is a real guest load or store
(kvmits.lab.ItsLab), every command is read by KVM from guest RAM. In the arm64 testbed each
stream is named on the console first (kvmits.lab.testbed_console), so a guest kernel fault
(oops, panic, a WARNING in KVM) comes back from tools/testbed with the ITS and the seed that
were running, and the testbed ends with its fault status.

What is checked after each stream (docs/fuzzing.md):

- the VMM keeps serving: every access ends (the agent answers, or reports the fault its own
  vCPU took), no vCPU thread failed, the agent did not panic;
- no vCPU stop exceeds a bound: the userspace ITS reports each stop of the vCPUs
  (UserMachineIts.stop_observers); for the kernel's ITS, whose commands run inside the vCPU's
  GITS_CWRITER store, the time of each guest access stands for it;
- the VM still delivers a known LPI: the guest re-initialises its ITS the way a driver does
  (GITS_CTLR.Enabled = 0, wait for Quiescent, GITS_BASER<n>, GITS_CBASER, GITS_CWRITER, Enabled = 1;
  IHI 0069 5.2.1), maps a DeviceID/EventID of its own to an LPI on a vCPU chosen by the seed,
  and an MSI (KVM_SIGNAL_MSI) must reach that vCPU.

What a stream may not do is damage the guest itself, or the check could not tell an ITS bug
from a guest that overwrote its own code: every address a stream hands the ITS (a table base, an
ITT, a queue, a level-1 entry, any doubleword of a command's DW2) is in the **arena**, 2 MiB at
the top of RAM that nothing else uses, or outside RAM altogether. Values that are not addresses
are random. A stream is a pure function of its seed; streams run one after another in one VM
(`--per-vm`), so a failure reproduces by replaying the streams of its VM from the first.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field

from kvmits.errors import GuestMemoryError, KvmError, KvmitsError
from kvmits.its import commands as cmd
from kvmits.its.abi import ItsTableError
from kvmits.its.registers import (GITS_BASER, GITS_BASER0, GITS_BASER_VALID, GITS_BASER_COUNT, GITS_CBASER, GITS_CBASER_ADDR_MASK,
                                  GITS_CBASER_SIZE_MASK, GITS_CBASER_VALID, GITS_CMD_OFFSET_MASK, GITS_CREADR,
                                  GITS_CREADR_STALLED, GITS_CTLR, GITS_CTLR_ENABLED, GITS_CTLR_QUIESCENT, GITS_CWRITER,
                                  GITS_IIDR, GITS_MPIDR, GITS_PIDR2, GITS_STATUSR, GITS_TRANSLATER, GITS_TYPER,
                                  GITS_UMSIR, ITS_CMD_SIZE, ITS_FRAME_SIZE, LPI_BASE)
from kvmits.lab.its_lab import ItsLab
from kvmits.lab.testbed_console import TestbedConsole
from kvmits.machine.agent.protocol import AgentRequestFailed, ErrorCode
from kvmits.machine.memmap import HIDDEN_ITS_BASE, HIDDEN_ITS_PRIVATE_BASE, RAM_BASE

MEM_SIZE = 64 << 20
CPUS = 2
#: the longest vCPU stop (or guest access) a stream may cause, s: the testbed's emulated arm64
#: runs the userspace ITS's 1024-command budget well within it
DEFAULT_BOUND = 2.0
ARENA_SIZE = 2 << 20
#: addresses a stream programs lie in the arena's first half: what the ITS may write past one
#: (an ITE at EventID 2^16 - 1, a DTE at DeviceID 2^16 - 1, a level-2 page) stays in the arena
ARENA_SPAN = 1 << 20

# The stream's own check: a DeviceID, a collection and an LPI no stream uses. The lab's device
# and collection tables are one 64 KiB page of 8-byte entries: IDs below 8192.
CHECK_DEVID = 0x1FF0
CHECK_ICID = 0x1F0
CHECK_LPI = LPI_BASE + 4000
#: every FORGET_EVERY-th seed's check starts from no mappings (StreamRunner.reinit)
FORGET_EVERY = 4
#: the LPIs streams map: a small range, so that INT, MOVI and DISCARD meet mapped ones
STREAM_LPIS = range(LPI_BASE, LPI_BASE + 64)

KNOWN_OFFSETS = (GITS_CTLR, GITS_IIDR, GITS_TYPER, GITS_TYPER + 4, GITS_MPIDR, GITS_STATUSR, GITS_UMSIR,
                 GITS_CBASER, GITS_CBASER + 4, GITS_CWRITER, GITS_CWRITER + 4, GITS_CREADR, GITS_CREADR + 4,
                 *(GITS_BASER(n) + half for n in range(GITS_BASER_COUNT) for half in (0, 4)),
                 GITS_PIDR2, GITS_TRANSLATER)
#: the registers whose value is an address the ITS reads and writes: a stream writes them only
#: with values of `Arena.register_value`, whole (4 or 8 bytes, naturally aligned: IHI 0069 12.1.3
#: leaves other accesses to them UNPREDICTABLE)
ADDRESS_REGISTERS = (range(GITS_CBASER, GITS_CBASER + 8), range(GITS_BASER0, GITS_BASER0 + 8 * GITS_BASER_COUNT))

WILD_DEVIDS = (0, 1, 2, 3, 4, 5, 6, 7, 0xFF, 0x1FFF, 0x2000, 0xFFFF, 0x10000, 0xFFFFFFFF)
WILD_EVENTIDS = (0, 1, 2, 3, 7, 15, 0xFF, 0xFFFF, 0x10000, 0xFFFFFFFF)
WILD_INTIDS = (0, 1023, LPI_BASE - 1, 0xFFFF, 0x10000, 0xFFFFFFFF)
WILD_ICIDS = (0, 1, 2, 3, 4, 0xFF, 0xFFFF)
#: most IDs come from small sets, so that a stream's MAPD, MAPTI, INT and MSI meet each other
SANE_DEVIDS = range(4)
SANE_EVENTIDS = range(8)
OPCODES = tuple(sorted(cmd.LAYOUTS))


def _in(offset: int, ranges) -> bool:
    return any(offset in r for r in ranges)


@dataclass(frozen=True)
class Arena:
    """Where a stream's addresses point: the arena (at the top of RAM), or outside RAM."""

    base: int
    ram_end: int

    @classmethod
    def of(cls, mem_size: int = MEM_SIZE) -> Arena:
        end = RAM_BASE + mem_size
        return cls(end - ARENA_SIZE, end)

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.base <= addr and addr + size <= self.base + ARENA_SIZE

    def outside(self) -> tuple[int, ...]:
        """Addresses that are not RAM: nothing, the hidden ITS's frame and memory (its="user"),
        just past RAM, the 40-bit IPA limit, beyond it."""
        return (0, 0x1000, HIDDEN_ITS_BASE, HIDDEN_ITS_PRIVATE_BASE, self.ram_end, self.ram_end + 0x10000,
                1 << 40, (1 << 48) - 0x10000)

    def address(self, rng: random.Random, align: int) -> int:
        if rng.random() < 0.9:
            return self.base + rng.randrange(0, ARENA_SPAN, align)
        return rng.choice(self.outside()) & ~(align - 1)

    def word(self, rng: random.Random) -> int:
        """A doubleword that is safe wherever the ITS finds it (a level-1 entry, a command's
        DW2, a DTE): bits [51:8] are an arena or out-of-RAM address, or small; the bits above
        (Valid, ...) and below are random."""
        kind = rng.random()
        if kind < 0.5:
            low = self.address(rng, 256) | rng.randrange(256)
        elif kind < 0.7:
            low = rng.randrange(1 << 16)            # bits [51:8] < 256: an address below 64 KiB
        else:
            low = rng.getrandbits(32) << 32 | rng.randrange(256)   # >= 4 GiB unless bits [63:32] are 0
            low &= (1 << 52) - 1
            if low < (1 << 32):
                low |= 1 << 40
        return low | (rng.getrandbits(12) << 52)

    def register_value(self, rng: random.Random) -> int:
        """A GITS_BASER<n>/GITS_CBASER value: an address of the arena (or none of RAM), every
        other field random. Either half written alone keeps the register safe: RAM lies below
        4 GiB, so a non-zero high half is no RAM address, and every low half is the arena's or
        outside RAM."""
        addr = self.address(rng, 0x1000)
        return (addr | rng.getrandbits(12) | rng.getrandbits(12) << 52
                | (1 << 63 if rng.random() < 0.8 else 0))


# -- streams -----------------------------------------------------------------------------------
# One operation is a tuple; its first item says what it is:
#   ("read", offset, width)                 a guest load from the ITS frame
#   ("write", offset, width, value)         a guest store to the ITS frame
#   ("program", offset, value, disable, enable)  GITS_CBASER/GITS_BASER<n> := value (GITS_CTLR
#                                           Enabled = 0 before if `disable`, = 1 after if `enable`)
#   ("commands", [32-byte commands], cwriter)  into the queue GITS_CBASER names (when that is the
#                                           arena or the guest's own queue), then GITS_CWRITER :=
#                                           past them (cwriter None) or := cwriter
#   ("msi", devid, eventid)                 KVM_SIGNAL_MSI from the host
#   ("poke", gpa, value)                    a doubleword of arena memory (a table entry, a command)
#   ("save",)                               the host saves the tables (KVM_DEV_ARM_ITS_SAVE_TABLES)


def _id(rng: random.Random, wild: tuple, sane: range | None = None) -> int:
    r = rng.random()
    if sane is not None and r < 0.6:
        return rng.choice(sane)
    if r < 0.9:
        return rng.choice(wild)
    return rng.getrandbits(32)


def _command(rng: random.Random, arena: Arena, cpus: int) -> bytes:
    dev = _id(rng, WILD_DEVIDS, SANE_DEVIDS)
    ev = _id(rng, WILD_EVENTIDS, SANE_EVENTIDS)
    icid = _id(rng, WILD_ICIDS, range(cpus + 1))
    rd = _id(rng, (0, 1, cpus, 0xFFFF, 0xFFFFFFFF), range(cpus))
    which = rng.randrange(14)
    if which == 0:
        return cmd.encode_mapd(dev, arena.address(rng, 256), rng.choice((1, 2, 4, 8, 16, 17, 24, 32)),
                               rng.random() < 0.8)
    if which == 1:
        return cmd.encode_mapc(icid, rd, rng.random() < 0.8)
    if which == 2:
        return cmd.encode_mapti(dev, ev, _id(rng, WILD_INTIDS, STREAM_LPIS), icid)
    if which == 3:
        return cmd.encode_mapi(dev, ev, icid)
    if which == 4:
        return cmd.encode_movi(dev, ev, icid)
    if which == 5:
        return cmd.encode_int(dev, ev)
    if which == 6:
        return cmd.encode_clear(dev, ev)
    if which == 7:
        return cmd.encode_inv(dev, ev)
    if which == 8:
        return cmd.encode_discard(dev, ev)
    if which == 9:
        return cmd.encode_invall(icid)
    if which == 10:
        return cmd.encode_movall(rd, _id(rng, (0, 1, cpus, 0xFFFFFFFF), range(cpus)))
    if which == 11:
        return cmd.encode_sync(rd)
    # a raw command: a known or any command number, random fields, reserved bits included;
    # DW2 holds MAPD's ITT_addr, so it is an arena-safe word whatever the number
    number = rng.choice(OPCODES) if rng.random() < 0.7 else rng.randrange(256)
    return cmd.encode_raw(rng.getrandbits(56) << 8 | number, rng.getrandbits(64), arena.word(rng),
                          rng.getrandbits(64))


def _offset(rng: random.Random) -> tuple[int, int]:
    width = rng.choice((1, 2, 4, 4, 8, 8))
    if rng.random() < 0.7:
        return rng.choice(KNOWN_OFFSETS), width
    offset = rng.randrange(ITS_FRAME_SIZE)    # both frames: control and GITS_TRANSLATER's
    if rng.random() < 0.7:
        offset &= ~(width - 1)               # mostly aligned: an unaligned one faults in the guest
    return offset, width


def make_stream(seed: int, arena: Arena, cpus: int = CPUS) -> list[tuple]:
    """The operations of stream `seed`: the same for the same seed, arena and vCPU count."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    mapped: list[tuple[int, int]] = []
    for _ in range(rng.randint(3, 10)):
        kind = rng.random()
        if kind < 0.2:
            ops.append(("read", *_offset(rng)))
        elif kind < 0.4:
            offset, width = _offset(rng)
            if _in(offset, ADDRESS_REGISTERS):
                width = rng.choice((4, 8))
                offset &= ~(width - 1)
                value = arena.register_value(rng)
                value = value >> 32 if offset % 8 == 4 else value
            elif offset == GITS_CTLR and rng.random() < 0.5:
                value = rng.choice((0, GITS_CTLR_ENABLED))
            else:
                value = rng.getrandbits(64)
            ops.append(("write", offset, width, value & ((1 << 8 * width) - 1)))
        elif kind < 0.5:
            reg = GITS_CBASER if rng.random() < 0.4 else GITS_BASER(rng.randrange(GITS_BASER_COUNT))
            disable = rng.random() < 0.7
            ops.append(("program", reg, arena.register_value(rng), disable, disable and rng.random() < 0.7))
        elif kind < 0.65:
            # what a driver does: a device, an event on an LPI of a mapped collection, an INT
            dev, ev = rng.choice(SANE_DEVIDS), rng.choice(SANE_EVENTIDS)
            commands = [cmd.encode_mapd(dev, arena.address(rng, 256), rng.randint(3, 16)),
                        cmd.encode_mapti(dev, ev, rng.choice(STREAM_LPIS), rng.randrange(cpus)),
                        cmd.encode_int(dev, ev), cmd.encode_sync(rng.randrange(cpus))]
            mapped.append((dev, ev))
            ops.append(("commands", commands, None))
        elif kind < 0.8:
            n = rng.randint(1, 8) if rng.random() < 0.9 else rng.randint(32, 600)
            commands = [_command(rng, arena, cpus) for _ in range(n)]
            cwriter = None if rng.random() < 0.85 else rng.getrandbits(rng.choice((8, 20, 32, 64)))
            ops.append(("commands", commands, cwriter))
        elif kind < 0.9:
            if mapped and rng.random() < 0.7:
                ops.append(("msi", *rng.choice(mapped)))
            else:
                ops.append(("msi", _id(rng, WILD_DEVIDS, SANE_DEVIDS), _id(rng, WILD_EVENTIDS, SANE_EVENTIDS)))
        elif kind < 0.98:
            ops.append(("poke", arena.base + rng.randrange(0, ARENA_SIZE, 8), arena.word(rng)))
        else:
            ops.append(("save",))
    return ops


def describe(op: tuple) -> str:
    kind = op[0]
    if kind == "commands":
        names = [_describe_command(c) for c in op[1]]
        shown = "; ".join(names[:8]) + (f"; ... ({len(names)} in all)" if len(names) > 8 else "")
        tail = "" if op[2] is None else f", then GITS_CWRITER := {op[2]:#x}"
        return f"commands [{shown}]{tail}"
    if kind in ("read", "write"):
        value = "" if kind == "read" else f" := {op[3]:#x}"
        return f"{kind} {op[2]} byte(s) at ITS + {op[1]:#x}{value}"
    if kind == "program":
        around = " (Enabled = 0 first, then 1)" if op[4] else " (Enabled = 0 first)" if op[3] else ""
        return f"program ITS + {op[1]:#x} := {op[2]:#x}{around}"
    if kind == "msi":
        return f"KVM_SIGNAL_MSI DeviceID {op[1]:#x} EventID {op[2]:#x}"
    if kind == "poke":
        return f"poke {op[1]:#x} := {op[2]:#018x}"
    return "save the ITS tables"


def _describe_command(raw: bytes) -> str:
    fields = cmd.decode_command(*cmd.COMMAND.unpack(raw))
    name = fields.pop("command")
    return name + "(" + ", ".join(f"{k}={int(v):#x}" for k, v in fields.items()) + ")"


# -- running streams -----------------------------------------------------------------------------
class StreamFailure(AssertionError):
    """The machine did not survive a stream: what the fuzzer reports, with the seed."""


@dataclass
class Stats:
    """What one ITS's run did; `failures` carries the seeds to replay."""

    its: str
    streams: int = 0
    vms: int = 0
    ops: dict = field(default_factory=dict)
    accesses: int = 0
    refused: int = 0                 # accesses the guest's own vCPU faulted on (alignment, ...)
    commands: int = 0
    msis_delivered: int = 0
    msi_errors: dict = field(default_factory=dict)
    saves: int = 0
    save_errors: dict = field(default_factory=dict)
    forgets: int = 0                 # re-initialisations that dropped every mapping
    reinits: int = 0
    not_quiescent: int = 0           # a stream left the ITS disabled with its queue not empty
    resets: int = 0                  # re-initialisations the guest could not do: KVM's reset
    access_max_s: float = 0.0
    access_max_seed: int | None = None
    stop_max_s: float = 0.0          # the userspace ITS's longest vCPU stop (UserMachineIts)
    stop_max_seed: int | None = None
    elapsed_s: float = 0.0
    failures: list = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["streams_per_s"] = round(self.streams / self.elapsed_s, 2) if self.elapsed_s else None
        return d


class StreamRunner:
    """One VM (an ItsLab) the streams run in, one after another."""

    def __init__(self, its: str, stats: Stats, bound: float, mem_size: int = MEM_SIZE, cpus: int = CPUS,
                 timeout: float = 20.0):
        self.stats = stats
        self.bound = bound
        self.cpus = cpus
        self.arena = Arena.of(mem_size)
        self.lab = ItsLab(cpus=cpus, its=its, mem_size=mem_size, timeout=timeout)
        try:
            # the arena is the guest heap's no-go zone: the driver's tables, queue and ITTs stay below
            self.lab.heap.end = self.arena.base
            self.lab.setup(lpis_enabled=True)
            self.check_itt = self.lab.heap.alloc(256, 256)
            self.access = self.lab.agent.client(0, timeout)
            self.its_base = self.lab.its.base
            self.own_queue = (self.lab.its.queue, self.lab.its.queue_size)
            # what the guest re-initialises its ITS with: the registers as its driver left them
            self.registers = {off: self.lab.its.read_reg(off) for off in
                              (GITS_CBASER, *(GITS_BASER(n) for n in range(GITS_BASER_COUNT)))}
            self._stop = self._access_max = 0.0
            observers = getattr(self.lab.machine.its, "stop_observers", None)
            if observers is not None:
                observers.append(self._on_stop)
        except BaseException:
            self.lab.close()
            raise
        stats.vms += 1

    def _on_stop(self, wait: float, held: float, commands: int, vcpus: int) -> None:
        self._stop = max(self._stop, held)

    def close(self) -> None:
        self.lab.close()

    # -- guest accesses, timed --------------------------------------------------------------
    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            took = time.perf_counter() - t0
            self.stats.accesses += 1
            if took > self._access_max:
                self._access_max = took

    def read(self, offset: int, width: int) -> int | None:
        try:
            return self._timed(self.access.read, self.its_base + offset, width)
        except AgentRequestFailed as exc:
            return self._refused(exc)

    def write(self, offset: int, width: int, value: int) -> None:
        try:
            self._timed(self.access.write, self.its_base + offset, width, value)
        except AgentRequestFailed as exc:
            self._refused(exc)

    def _refused(self, exc: AgentRequestFailed) -> None:
        # the guest's own vCPU faulted (an unaligned access to Device memory) or the agent
        # refused a width: the guest's problem, not the ITS's
        if exc.code not in (ErrorCode.FAULT, ErrorCode.BAD_ARG):
            raise exc
        self.stats.refused += 1
        return None

    # -- one stream -------------------------------------------------------------------------
    def run(self, seed: int) -> None:
        """Stream `seed`, then the check. Raises StreamFailure (or the error that ended it)."""
        self._access_max = 0.0
        self._stop = 0.0
        for op in make_stream(seed, self.arena, self.cpus):
            self.stats.ops[op[0]] = self.stats.ops.get(op[0], 0) + 1
            getattr(self, "_op_" + op[0])(*op[1:])
        self.lab.agent.check()
        self.check(seed)
        self.stats.streams += 1
        if self._access_max > self.stats.access_max_s:
            self.stats.access_max_s, self.stats.access_max_seed = self._access_max, seed
        if self._stop > self.stats.stop_max_s:
            self.stats.stop_max_s, self.stats.stop_max_seed = self._stop, seed
        worst = max(self._access_max, self._stop)
        if worst > self.bound:
            raise StreamFailure(f"a vCPU stop of {worst:.3f} s (bound {self.bound} s)")

    def _op_read(self, offset, width):
        self.read(offset, width)

    def _op_write(self, offset, width, value):
        self.write(offset, width, value)

    def _op_program(self, offset, value, disable, enable):
        if disable:
            self.write(GITS_CTLR, 4, 0)
        self.write(offset, 8, value)
        if enable:
            self.write(GITS_CTLR, 4, GITS_CTLR_ENABLED)

    def _queue(self) -> tuple[int, int] | None:
        """The command queue GITS_CBASER names, if the host may write commands into it: the
        arena's, or the guest driver's own."""
        cbaser = self.read(GITS_CBASER, 8)
        if cbaser is None or not cbaser & GITS_CBASER_VALID:
            return None
        base, size = cbaser & GITS_CBASER_ADDR_MASK, ((cbaser & GITS_CBASER_SIZE_MASK) + 1) * 0x1000
        if self.arena.contains(base, size) or (base, size) == self.own_queue:
            return base, size
        return None

    def _op_commands(self, commands, cwriter):
        queue = self._queue()
        current = self.read(GITS_CWRITER, 8)
        offset = (current or 0) & GITS_CMD_OFFSET_MASK
        if queue is not None:
            base, size = queue
            commands = commands[:size // ITS_CMD_SIZE - 1]
            for c in commands:
                offset %= size
                self.lab.machine.ram.write(base + offset, c)
                offset += ITS_CMD_SIZE
            offset %= size
            self.stats.commands += len(commands)
        self.write(GITS_CWRITER, 8, offset if cwriter is None else cwriter)

    def _op_msi(self, devid, eventid):
        try:
            self.stats.msis_delivered += self.lab.msi(devid, eventid)
        except KvmError as exc:
            # KVM_SIGNAL_MSI may refuse an MSI it cannot translate with an errno (the kernel's
            # ITS: vgic_its_inject_msi); counted, per errno
            key = f"{exc.ioctl}:{exc.errno_name}"
            self.stats.msi_errors[key] = self.stats.msi_errors.get(key, 0) + 1

    def _op_poke(self, gpa, value):
        self.lab.machine.ram.write_u64(gpa, value)

    def _op_save(self):
        try:
            self.lab.its_tables()
            self.stats.saves += 1
        except (KvmError, ItsTableError, GuestMemoryError) as exc:
            # tables or ITTs a stream pointed outside RAM do not save (KVM: EFAULT), or what
            # was saved does not decode: counted by kind
            key = f"{exc.ioctl}:{exc.errno_name}" if isinstance(exc, KvmError) else type(exc).__name__
            self.stats.save_errors[key] = self.stats.save_errors.get(key, 0) + 1

    # -- the check --------------------------------------------------------------------------
    def reinit(self, forget: bool = False) -> bool:
        """What a guest driver does to start its ITS over (IHI 0069 5.2.1): Enabled = 0, wait
        a little for Quiescent, the tables and the queue, GITS_CWRITER = 0, Enabled = 1. True
        if the ITS came back Enabled and Quiescent with an empty queue.

        A disabled ITS does not process its queue, so one a stream left disabled with commands
        published never becomes Quiescent (KVM: GITS_CREADR != GITS_CWRITER); the GITS_CBASER
        write empties the queue (it zeroes GITS_CREADR, 12.19.3), so the driver goes on.

        `forget`: each table's GITS_BASER<n> is written with Valid = 0 first, which drops every
        device and collection (KVM frees its lists; the model, its tables' contents), so that
        the mappings of one stream (an ITT out of RAM, which no later save survives) do not
        outlive it."""
        self.write(GITS_CTLR, 4, 0)
        for _ in range(3):
            ctlr = self.read(GITS_CTLR, 4)
            if ctlr is not None and ctlr & GITS_CTLR_QUIESCENT:
                break
        else:
            self.stats.not_quiescent += 1
        for offset, value in self.registers.items():
            if value and offset != GITS_CBASER:
                if forget:
                    self.write(offset, 8, value & ~GITS_BASER_VALID)
                self.write(offset, 8, value)
        self.write(GITS_CBASER, 8, self.registers[GITS_CBASER])
        self.write(GITS_CWRITER, 8, 0)
        self.write(GITS_CTLR, 4, GITS_CTLR_ENABLED)
        self.lab.its.cwriter = 0
        ctlr, creadr = self.read(GITS_CTLR, 4), self.read(GITS_CREADR, 8)
        want = GITS_CTLR_ENABLED | GITS_CTLR_QUIESCENT
        return ctlr is not None and ctlr & want == want and creadr == 0

    def check(self, seed: int) -> None:
        self.stats.reinits += 1
        forget = seed % FORGET_EVERY == 0
        self.stats.forgets += forget
        if not self.reinit(forget):
            self.stats.resets += 1
            self.lab.reset_its()
        target = seed % self.cpus
        its = self.lab.its
        self.lab.agent.take_irqs()
        try:
            its.submit(cmd.encode_mapd(CHECK_DEVID, self.check_itt, 1), cmd.encode_mapc(CHECK_ICID, target),
                       cmd.encode_mapti(CHECK_DEVID, 0, CHECK_LPI, CHECK_ICID), cmd.encode_sync(target))
        except Exception as exc:    # noqa: BLE001 - DriverError, an agent error: the report says which
            raise StreamFailure(f"the check's commands did not run: {exc!r}") from exc
        delivered = self.lab.msi(CHECK_DEVID, 0)
        if delivered != 1:
            raise StreamFailure(f"KVM_SIGNAL_MSI of the check's DeviceID {CHECK_DEVID:#x} returned {delivered}")
        try:
            self.lab.expect(target, CHECK_LPI, timeout=10.0)
        except AssertionError as exc:
            raise StreamFailure(str(exc)) from exc


def fuzz_its(its: str, seeds: range, *, per_vm: int, bound: float, console: TestbedConsole,
             progress=None, max_failures: int = 10) -> Stats:
    """Streams `seeds` against one ITS kind, `per_vm` streams per VM; a failure is recorded
    with its seed and the first seed of its VM, and the run goes on in a new VM."""
    stats = Stats(its)
    t0 = time.monotonic()
    runner: StreamRunner | None = None
    first = seeds.start
    try:
        for i, seed in enumerate(seeds):
            if runner is None or (i and i % per_vm == 0):
                if runner is not None:
                    runner.close()
                    runner = None
                first = seed
                runner = StreamRunner(its, stats, bound)
            console.running(f"guest-fuzz:its={its}:seed={seed}:vm-first-seed={first}")
            try:
                runner.run(seed)
            except (KvmitsError, AssertionError, OSError, RuntimeError) as exc:
                # every way a stream can end badly (an agent error, a timeout, an ioctl, the
                # guest driver's DriverError, a StreamFailure): recorded
                stats.failures.append({"its": its, "seed": seed, "vm_first_seed": first,
                                       "what": f"{type(exc).__name__}: {exc}"})
                if progress:
                    progress(f"guest-fuzz {its}: FAILED seed {seed} (VM from seed {first}): {exc}")
                _close_quietly(runner)
                runner = None
                if len(stats.failures) >= max_failures:
                    break
            if progress and (i + 1) % 500 == 0:
                progress(f"guest-fuzz {its}: {i + 1}/{len(seeds)} streams, {stats.refused} refused accesses, "
                         f"{len(stats.failures)} failure(s), {time.monotonic() - t0:.0f} s")
    finally:
        if runner is not None:
            _close_quietly(runner)
        stats.elapsed_s = round(time.monotonic() - t0, 1)
    return stats


def _close_quietly(runner: StreamRunner) -> None:
    try:
        runner.close()
    except (KvmitsError, OSError, RuntimeError) as exc:
        print(f"guest-fuzz: closing the VM failed too: {exc!r}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvmits.fuzz.guest", description=__doc__.split("\n\n")[0])
    p.add_argument("--its", default="kernel,user", help="ITS kinds, comma-separated (default kernel,user)")
    p.add_argument("--streams", type=int, default=1000, help="streams per ITS (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="the first stream's seed (default 1)")
    p.add_argument("--per-vm", type=int, default=250, help="streams per VM before a fresh one (default 250)")
    p.add_argument("--bound", type=float, default=DEFAULT_BOUND,
                   help=f"the longest vCPU stop allowed, s (default {DEFAULT_BOUND})")
    p.add_argument("--max-failures", type=int, default=10, help="stop an ITS's run after this many")
    p.add_argument("--json", metavar="PATH", help="write the results there too")
    p.add_argument("--show", type=int, metavar="SEED", help="print the operations of stream SEED and exit")
    args = p.parse_args(argv)
    if args.show is not None:
        for op in make_stream(args.show, Arena.of()):
            print(describe(op))
        return 0
    kinds = [k for k in args.its.split(",") if k]
    if args.streams < 1 or args.per_vm < 1 or not kinds:
        p.error("--streams and --per-vm must be >= 1, --its must name an ITS")
    console = TestbedConsole()
    results = []

    def progress(line):
        print(line, flush=True)

    for its in kinds:
        stats = fuzz_its(its, range(args.seed, args.seed + args.streams), per_vm=args.per_vm,
                         bound=args.bound, console=console, progress=progress, max_failures=args.max_failures)
        results.append(stats.as_dict())
        print("KVMITS-GUEST-FUZZ " + json.dumps(stats.as_dict(), sort_keys=True), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
