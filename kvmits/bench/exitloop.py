"""Figure 4 of `kvmits bench`: the Python MMIO exit loop against a C floor measured in the same run.

The guest loops on "load from MMIO, add 1, store to MMIO" at an address no memory slot covers,
so every access is a KVM_EXIT_MMIO (two per iteration):

  x86_64 : a real-mode guest (the bytes of tests/x86guest.py LOOP), on the host's KVM
  aarch64: an EL1 guest with the MMU off, five hand-encoded A64 instructions (A64_LOOP)

Three loops over the same guest code, each in its own VM of one vCPU:

  c_floor : benchmarks/c/exit_floor.c (built by `make -C benchmarks/c`): KVM_RUN, look at the
            exit, answer a read; the least a VMM can do
  kvm     : kvmits.kvm.Vcpu.run() + complete_mmio_read() on the calling thread: the generic layer
  python  : the machine's full path: a kvmits.machine.runner.VcpuRunner thread dispatching every
            exit through kvmits.machine.bus.MmioBus to a device model (what every userspace
            device of a Machine goes through)

The overhead of Python is the ratio python / c_floor of the cost of one exit; kvm sits between
the two and says which part of the overhead is the generic layer and which the runner and bus.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

from kvmits.bench import figure, x86guest

ROOT = Path(__file__).resolve().parents[2]
C_DIR = ROOT / "benchmarks" / "c"

# loop: mov ax,[0x9002] ; add ax,1 ; mov [0x9004],ax ; jmp loop

A64_RAM, A64_RAM_SIZE, A64_MMIO = 0x4000_0000, 0x1_0000, 0x1000_0000
# movz x1,#0x1000,lsl #16 ; loop: ldr w0,[x1] ; add w0,w0,#1 ; str w0,[x1,#4] ; b loop
# (Arm ARM C6; the same words as benchmarks/c/exit_floor.c)
A64_LOOP = struct.pack("<5I", 0xD2A20001, 0xB9400020, 0x11000400, 0xB9000420, 0x17FFFFFD)


def supported_arch() -> str | None:
    arch = platform.machine()
    return arch if arch in ("x86_64", "aarch64") else None


def floor_binary(arch: str) -> Path:
    return C_DIR / "build" / f"exit_floor-{arch}"


def build_floor() -> str | None:
    """`make -C benchmarks/c` where there is a compiler; None if it worked, else why not."""
    if not (C_DIR / "Makefile").is_file():
        return "benchmarks/c is not in this installation"
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "cc")) is None:
        return "no make or C compiler here"
    proc = subprocess.run(["make", "-s", "-C", str(C_DIR)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True, check=False)
    if proc.returncode != 0:
        return f"make -C benchmarks/c failed: {proc.stdout.strip()[-500:]}"
    return None


def run_floor(arch: str, exits: int, repeat: int) -> list[float]:
    """Seconds per `exits` exits, `repeat` times, by the C floor program."""
    binary = floor_binary(arch)
    if not binary.is_file():
        why = build_floor()
        if not binary.is_file():
            raise FileNotFoundError(f"{binary} is not built (make -C benchmarks/c): {why or 'make made nothing'}")
    proc = subprocess.run([str(binary), str(exits), str(repeat)], capture_output=True, stdin=subprocess.DEVNULL,
                          text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{binary.name} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)["seconds"]


def _vm_with_loop(kvm, arch: str):
    """A VM of one vCPU running the loop guest; returns (vm, vcpu, ram)."""
    from kvmits import uapi
    from kvmits.kvm import GuestMemory

    vm = kvm.create_vm()
    if arch == "x86_64":
        vcpu, ram = x86guest.boot(vm, x86guest.LOOP)
    else:
        ram = GuestMemory(A64_RAM, A64_RAM_SIZE)
        ram.write(A64_RAM, A64_LOOP)
        vm.add_memory(ram)
        vcpu = vm.create_vcpu(0)
        vcpu.arm_init(features=())
        vcpu.set_one_reg(uapi.arm64_core_reg("pc"), A64_RAM)
    return vm, vcpu, ram


def kvm_loop(vcpu, exits: int) -> float:
    """The generic layer alone: Vcpu.run() and answering reads, on this thread."""
    value = 0
    run = vcpu.run
    complete = vcpu.complete_mmio_read
    t0 = time.perf_counter()
    for _ in range(exits):
        ex = run()
        if ex.is_write:
            value = ex.data
        else:
            complete(value)
    return time.perf_counter() - t0


class LoopDevice:
    """The guest's MMIO window on the bus: reads answer the last value written. Notes the time at
    each of `marks` (counts of accesses) and stops the runner after the last one."""

    def __init__(self, marks: list[int]):
        self.value = 0
        self.n = 0
        self._marks = marks
        self._next = marks[0]
        self._i = 0
        self.times: list[float] = []
        self.done = threading.Event()
        self.runner = None

    def _mark(self) -> None:
        self.times.append(time.perf_counter())
        self._i += 1
        if self._i == len(self._marks):
            self._next = -1
            self.runner.stop()
            self.done.set()
        else:
            self._next = self._marks[self._i]

    def mmio_read(self, vcpu: int, offset: int, size: int) -> int:
        self.n += 1
        if self.n == self._next:
            self._mark()
        return self.value

    def mmio_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        self.value = value
        self.n += 1
        if self.n == self._next:
            self._mark()


def runner_loop(vcpu, arch: str, exits: int, repeat: int, warmup: int) -> list[float]:
    """The machine's path: a VcpuRunner thread, MmioBus dispatch, a device model."""
    from kvmits.machine.bus import MmioBus
    from kvmits.machine.runner import VcpuRunner, install_kick_handler

    install_kick_handler()
    marks = [warmup + exits * i for i in range(repeat + 1)]
    dev = LoopDevice(marks)
    bus = MmioBus()
    bus.add(x86guest.MMIO if arch == "x86_64" else A64_MMIO, 0x1000, dev, "exit-loop")
    runner = VcpuRunner([vcpu], bus)
    dev.runner = runner
    runner.start()
    runner.wait(timeout=600)
    if len(dev.times) != len(marks):
        raise RuntimeError(f"the loop guest stopped after {dev.n} exits")
    return [b - a for a, b in zip(dev.times, dev.times[1:])]


def measure(exits: int, repeat: int, progress=None) -> tuple[list[dict], list[dict]]:
    """(figures, skipped) of figure 4 on this host's KVM."""
    from kvmits.kvm import Kvm

    arch = supported_arch()
    if arch is None:
        return [], [{"part": 4, "reason": f"no exit-loop guest for {platform.machine()}"}]
    figures, skipped = [], []
    warmup = exits // 10 + 1000

    def rates(seconds):
        return [exits / s for s in seconds]

    if progress:
        progress(f"exit loop ({arch}): C floor")
    try:
        figures.append(figure(4, "exit_loop", None, "c_floor", "exits/s", "higher", rates(run_floor(arch, exits, repeat)),
                              arch=arch))
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        skipped.append({"part": 4, "path": "c_floor", "reason": str(exc)})
    if progress:
        progress(f"exit loop ({arch}): Python")
    with Kvm() as kvm:
        vm, vcpu, ram = _vm_with_loop(kvm, arch)
        try:
            kvm_loop(vcpu, warmup)
            figures.append(figure(4, "exit_loop", None, "kvm", "exits/s", "higher",
                                  rates([kvm_loop(vcpu, exits) for _ in range(repeat)]), arch=arch))
        finally:
            vm.close()
            ram.close()
        vm, vcpu, ram = _vm_with_loop(kvm, arch)
        try:
            figures.append(figure(4, "exit_loop", None, "python", "exits/s", "higher",
                                  rates(runner_loop(vcpu, arch, exits, repeat, warmup)), arch=arch))
        finally:
            vm.close()
            ram.close()
    return figures, skipped
