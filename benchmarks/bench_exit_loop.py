"""KVM_EXIT_MMIO round trips per second through Python, against the bare ioctl floor.

On an x86_64 host with /dev/kvm: the tiny real-mode guest of kvmits/bench/x86guest.py loops on
"read MMIO, add 1, write MMIO", so every iteration is two exits handled in Python.

  floor   : libc ioctl(KVM_RUN) through cffi + the minimum kvm_run access, no objects
  kvm     : kvmits.kvm.Vcpu.run() (typed, reused MmioExit) + answering reads

Usage: python3 benchmarks/bench_exit_loop.py [--exits N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvmits import uapi  # noqa: E402
from kvmits.kvm import Kvm  # noqa: E402
from kvmits.bench import x86guest  # noqa: E402
from kvmits.bench.exitloop import kvm_loop  # noqa: E402


def floor_loop(vcpu, exits: int) -> float:
    """The least Python can do per exit: the raw ioctl, one unpack, one pack for reads."""
    ioctl, fd, req, arg = uapi.libc.ioctl, vcpu.fd, uapi.KVM_RUN, uapi.ffi.cast("unsigned long", 0)
    run = vcpu._map
    head = struct.Struct("<I20xQQIB")
    u64 = struct.Struct("<Q")
    value = 0
    t0 = time.perf_counter()
    for _ in range(exits):
        ioctl(fd, req, arg)
        reason, phys, data, length, is_write = head.unpack_from(run, 8)
        if not is_write:
            u64.pack_into(run, 40, value)
        else:
            value = data & 0xFFFF
    return time.perf_counter() - t0


def measure(exits: int, repeat: int) -> dict:
    results = {}
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu, _ram = x86guest.boot(vm, x86guest.LOOP)
        kvm_loop(vcpu, 1000)                     # warm up (page faults, caches)
        for name, loop in (("floor", floor_loop), ("kvm", kvm_loop)):
            times = [loop(vcpu, exits) for _ in range(repeat)]
            rates = [exits / t for t in times]
            results[name] = {"exits_per_s_median": statistics.median(rates), "exits_per_s_min": min(rates),
                             "exits_per_s_max": max(rates), "us_per_exit_median": 1e6 / statistics.median(rates)}
    results["kvm_over_floor_cost_ratio"] = results["floor"]["exits_per_s_median"] / results["kvm"]["exits_per_s_median"]
    return {"exits": exits, "repeat": repeat, "host": os.uname().machine, "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = measure(args.exits, args.repeat)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.exits} MMIO exits x {args.repeat} runs on {out['host']} (tiny x86 real-mode guest)")
    for name, r in out["results"].items():
        if isinstance(r, dict):
            print(f"  {name:6s} {r['exits_per_s_median']:>10,.0f} exits/s  ({r['us_per_exit_median']:.2f} us/exit; "
                  f"min {r['exits_per_s_min']:,.0f}, max {r['exits_per_s_max']:,.0f})")
    print(f"  kvm layer cost / floor cost: {out['results']['kvm_over_floor_cost_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
