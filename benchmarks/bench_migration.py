"""Downtime of a live migration and the snapshot's size, per RAM size and ITS direction (issue 13).

On arm64 KVM (the testbed: `tools/testbed run -- python3 benchmarks/bench_migration.py`): a
4-vCPU agent guest (kvmits.lab.ItsLab) with LPIs, ITS tables and a few mappings, and a part of
its RAM filled with data (`--dirty`: the fraction, half of it random bytes, half a repeating
pattern; the rest stays zero, as in a guest that has not touched it). For each RAM size and
direction it migrates in one process (ItsLab.migrate: pause, capture, restore, close, start) and
through a snapshot file, and reports:

  downtime  : from the pause of the source to the start of the new VM (s), in process
  capture   : of which: reading vCPUs, vGIC, ITS, devices (RAM is copied by the restore)
  restore   : of which: building the new VM and applying the state
  file      : the same through a snapshot file: downtime, file size, write and read-back share

Usage: python3 benchmarks/bench_migration.py [--mem 128M,1G] [--dirty 0.1] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvmits.cli.run import parse_size  # noqa: E402
from kvmits.its.registers import LPI_BASE  # noqa: E402
from kvmits.lab.its_lab import ItsLab  # noqa: E402

DIRECTIONS = (("kernel", "kernel"), ("kernel", "user"), ("user", "kernel"), ("user", "user"))
CPUS = 4


def fill(lab, fraction: float) -> int:
    """Write data into the top `fraction` of the lab's RAM (away from the guest program and its
    heap at the bottom); returns the bytes written."""
    ram = lab.machine.ram
    size = int(ram.size * fraction) & ~0xFFFF
    start = ram.end - size
    half = size // 2
    ram.write(start, os.urandom(half))
    pattern = bytes(range(256)) * 256
    for off in range(half, size, len(pattern)):
        ram.write(start + off, pattern[:min(len(pattern), size - off)])
    return size


def measure(mem: int, src: str, dst: str, dirty: float, repeat: int) -> dict:
    runs, files = [], []
    with ItsLab(cpus=CPUS, its=src, mem_size=mem) as lab:
        lab.setup()
        lab.its.mapd(1, 4)
        for e in range(CPUS):
            lab.its.mapti(1, e, LPI_BASE + e, e)
        written = fill(lab, dirty)
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(repeat):
                for path in (None, os.path.join(tmp, "vm.snap")):
                    report = lab.migrate(dst, path=path)
                    (runs if path is None else files).append(report)
                    lab.migrate(src)                  # back, for the next round
                    for e in range(CPUS):             # still delivering
                        lab.msi(1, e)
                        lab.expect(cpu=e, intid=LPI_BASE + e)

    def stat(reports, key):
        values = [r[key] for r in reports]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {"mem": mem, "its": [src, dst], "dirty_bytes": written,
            "downtime": stat(runs, "downtime"), "capture": stat(runs, "capture"), "restore": stat(runs, "restore"),
            "file": {"downtime": stat(files, "downtime"), "bytes": files[-1]["snapshot"]["file_bytes"],
                     "write_seconds": stat([f["snapshot"] for f in files], "seconds")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem", default="128M,1G", help="RAM sizes, comma-separated (default 128M,1G)")
    ap.add_argument("--dirty", type=float, default=0.1, help="fraction of RAM filled with data (default 0.1)")
    ap.add_argument("--repeat", type=int, default=3, help="migrations per direction and way (default 3)")
    ap.add_argument("--directions", default="all", help="all, or e.g. kernel-user,user-kernel")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    directions = DIRECTIONS if args.directions == "all" else [tuple(d.split("-")) for d in args.directions.split(",")]
    results = []
    for mem in (parse_size(m) for m in args.mem.split(",")):
        for src, dst in directions:
            r = measure(mem, src, dst, args.dirty, args.repeat)
            results.append(r)
            if not args.json:
                print(f"{mem >> 20:5d} MiB {src:>6} -> {dst:<6} downtime {r['downtime']['median'] * 1e3:8.1f} ms "
                      f"(capture {r['capture']['median'] * 1e3:6.1f}, restore {r['restore']['median'] * 1e3:7.1f}; "
                      f"min {r['downtime']['min'] * 1e3:.1f}, max {r['downtime']['max'] * 1e3:.1f})  "
                      f"via file {r['file']['downtime']['median'] * 1e3:8.1f} ms, "
                      f"{r['file']['bytes'] / 1e6:7.1f} MB", flush=True)
    if args.json:
        print(json.dumps({"cpus": CPUS, "dirty": args.dirty, "repeat": args.repeat, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
