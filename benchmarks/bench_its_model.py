"""Userspace ITS model throughput: commands and translations per second, in pure Python.

Runs anywhere (no KVM): the model sees a bytearray guest memory and a counting LPI sink.

  commands     : a driver-like mix through the command queue -- per device a MAPD and a
                 burst of MAPTIs, then INT, INV and MOVI traffic, with SYNCs -- written to
                 the queue and executed by GITS_CWRITER writes (budget: the whole batch)
  signal_msi   : translated MSIs (hits) delivered to the sink
  translater   : GITS_TRANSLATER writes through mmio_write (hits)
  translate    : translate() queries (hits), the route-compilation path
  msi_miss     : MSIs to an unmapped EventID (dropped and counted)
  mmio_read    : register reads (GITS_CTLR, GITS_TYPER, GITS_CREADR) through mmio_read

Usage: python3 benchmarks/bench_its_model.py [--devices N] [--events N] [--msis N]
                                              [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvmits.errors import GuestMemoryError  # noqa: E402
from kvmits.its import ItsConfig, ItsModel, Redistributors  # noqa: E402
from kvmits.its import commands as C  # noqa: E402
from kvmits.its import registers as R  # noqa: E402

RAM_BASE = 0x4000_0000
QUEUE = RAM_BASE
QUEUE_PAGES = 256                      # 1 MiB: 32768 commands
DEVICE_TABLE = RAM_BASE + 0x10_0000
COLLECTION_TABLE = RAM_BASE + 0x11_0000
ITTS = RAM_BASE + 0x20_0000


class Ram:
    """Guest RAM as a bytearray, bounds-checked like kvmits.kvm.GuestMemory."""

    def __init__(self, base: int, size: int):
        self.base, self.end, self.buf = base, base + size, bytearray(size)

    def read(self, gpa: int, size: int) -> bytes:
        if gpa < self.base or gpa + size > self.end or size < 0:
            raise GuestMemoryError(gpa, size)
        off = gpa - self.base
        return bytes(self.buf[off:off + size])

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < self.base or gpa + len(data) > self.end:
            raise GuestMemoryError(gpa, len(data))
        off = gpa - self.base
        self.buf[off:off + len(data)] = data


class CountingSink:
    """An LPI sink that only counts (the cheapest real sink)."""

    def __init__(self):
        self.pending = 0
        self.other = 0

    def set_pending(self, intid, target):
        self.pending += 1

    def clear_pending(self, intid, target):
        self.other += 1

    def invalidate(self, intid, target):
        self.other += 1

    def invalidate_all(self, target):
        self.other += 1

    def move(self, intid, old_target, new_target):
        self.other += 1

    def move_all(self, old_target, new_target):
        self.other += 1

    def mapped(self, intid, target):
        self.other += 1

    def unmapped(self, intid, target):
        self.other += 1


def make_its(nr_vcpus: int):
    ram = Ram(RAM_BASE, 64 << 20)
    sink = CountingSink()
    its = ItsModel(ram, sink, Redistributors(nr_vcpus), ItsConfig(command_budget=1 << 15))
    w = its.mmio_write
    w(R.GITS_CBASER, 8, R.encode_cbaser(base=QUEUE, pages=QUEUE_PAGES))
    w(R.GITS_BASER0, 8, R.encode_baser(valid=True, type_=1, base=DEVICE_TABLE, pages=1))
    w(R.GITS_BASER0 + 8, 8, R.encode_baser(valid=True, type_=4, base=COLLECTION_TABLE, pages=1))
    w(R.GITS_CTLR, 4, 1)
    return its, ram, sink


def command_mix(devices: int, events: int, nr_vcpus: int) -> list[bytes]:
    """What a guest driver issues: collections, then per device MAPD + MAPTI burst + SYNC,
    then INT / INV / MOVI traffic over the mapped events."""
    cmds = [C.encode_mapc(v, v) for v in range(nr_vcpus)] + [C.encode_sync(0)]
    lpi = 8192
    for d in range(devices):
        cmds.append(C.encode_mapd(d, ITTS + d * 0x1000, max(1, (events - 1).bit_length())))
        for e in range(events):
            cmds.append(C.encode_mapti(d, e, lpi, e % nr_vcpus))
            lpi += 1
        cmds.append(C.encode_sync(0))
    for d in range(devices):
        for e in range(events):
            cmds.append(C.encode_int(d, e))
            cmds.append(C.encode_inv(d, e))
            cmds.append(C.encode_movi(d, e, (e + 1) % nr_vcpus))
        cmds.append(C.encode_sync(0))
    return cmds


def bench_commands(devices: int, events: int, nr_vcpus: int) -> tuple[float, int]:
    its, ram, _ = make_its(nr_vcpus)
    cmds = command_mix(devices, events, nr_vcpus)
    qsize = QUEUE_PAGES * 4096
    done = 0
    t0 = time.perf_counter()
    for start in range(0, len(cmds), 4096):
        chunk = cmds[start:start + 4096]
        offset = its.cwriter
        data = b"".join(chunk)
        # the guest writes its commands into the ring (wrapping), then kicks GITS_CWRITER
        first = min(len(data), qsize - offset)
        ram.write(QUEUE + offset, data[:first])
        if first < len(data):
            ram.write(QUEUE, data[first:])
        its.mmio_write(R.GITS_CWRITER, 8, (offset + len(data)) % qsize)
        done += len(chunk)
    elapsed = time.perf_counter() - t0
    assert its.creadr == its.cwriter and not its.error_counts, its.stats()
    return elapsed, done


def mapped_its(devices: int, events: int, nr_vcpus: int):
    its, ram, sink = make_its(nr_vcpus)
    cmds = command_mix(devices, events, nr_vcpus)[: nr_vcpus + 1 + devices * (events + 2)]
    ram.write(QUEUE, b"".join(cmds))
    its.mmio_write(R.GITS_CWRITER, 8, 32 * len(cmds))
    assert its.ite_count == devices * events and not its.error_counts
    return its, sink


def bench_loop(fn, pairs, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        d, e = pairs[i % len(pairs)]
        fn(d, e)
    return time.perf_counter() - t0


def run(devices: int, events: int, msis: int, nr_vcpus: int, repeat: int) -> dict:
    results: dict[str, list[float]] = {}

    def record(name, elapsed, count):
        results.setdefault(name, []).append(count / elapsed)

    for _ in range(repeat):
        elapsed, count = bench_commands(devices, events, nr_vcpus)
        record("commands", elapsed, count)
        its, sink = mapped_its(devices, events, nr_vcpus)
        pairs = [(d, e) for d in range(devices) for e in range(events)]
        record("signal_msi", bench_loop(its.signal_msi, pairs, msis), msis)
        def translater_write(d, e, write=its.mmio_write, offset=R.GITS_TRANSLATER):
            write(offset, 4, e, d)

        record("translater", bench_loop(translater_write, pairs, msis), msis)
        record("translate", bench_loop(its.translate, pairs, msis), msis)
        miss = [(d, events + 1) for d in range(devices)]
        record("msi_miss", bench_loop(its.signal_msi, miss, msis), msis)
        read = its.mmio_read
        regs = [(R.GITS_CTLR, 4), (R.GITS_TYPER, 8), (R.GITS_CREADR, 8)]
        record("mmio_read", bench_loop(read, regs, msis), msis)
        assert sink.pending >= 2 * msis
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "devices": devices, "events_per_device": events, "nr_vcpus": nr_vcpus,
        "operations_per_run": {"commands": len(command_mix(devices, events, nr_vcpus)),
                               "others": msis},
        "repeat": repeat,
        "per_second": {name: {"median": statistics.median(v), "best": max(v)}
                       for name, v in results.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=32)
    parser.add_argument("--events", type=int, default=64)
    parser.add_argument("--vcpus", type=int, default=4)
    parser.add_argument("--msis", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.devices <= 8192 or not 1 <= args.events <= 65536:
        parser.error("--devices must be 1..8192 and --events 1..65536")
    out = run(args.devices, args.events, args.msis, args.vcpus, args.repeat)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"ITS model, Python {out['python']} on {out['machine']}: {args.devices} devices x "
          f"{args.events} events, {args.vcpus} vCPUs, {args.repeat} runs (rates include the loop)")
    print(f"{'operation':<12} {'per second (median)':>20} {'best':>14} {'us each':>9}")
    for name, v in out["per_second"].items():
        print(f"{name:<12} {v['median']:>20,.0f} {v['best']:>14,.0f} {1e6 / v['median']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
