"""Figures 1 to 3 of `kvmits bench`: the kernel's ITS and the userspace ITS on the same guest
(the agent, driven through kvmits.lab.its_lab.ItsLab).

1. MSI delivery, end to end to a guest that counts LPIs in its memory without exiting (agent
   IRQ mode COUNT): throughput (batches of distinct LPIs sent as fast as possible, then wait
   until the guest's counters add up) and latency (one MSI, poll its counter).
2. A guest read of GITS_TYPER, timed by the guest with the virtual counter.
3. A command batch MAPTI + INT + SYNC published by one GITS_CWRITER write, until GITS_CREADR
   has caught up (for the userspace ITS: the stop of every vCPU included).
"""

from __future__ import annotations

import struct
import time

from kvmits.bench import figure
from kvmits.its import commands as cmd
from kvmits.its.registers import GITS_TYPER, LPI_BASE

MSI_DEVID = 0x42
BATCH_DEVID = 0x43
FIRST_GSI = 64
WAIT_TIMEOUT = 30.0


class Sizes:
    """How much work each figure does."""

    def __init__(self, quick: bool, repeat: int):
        self.repeat = repeat
        self.events = 32 if quick else 128            # distinct LPIs per throughput batch
        self.msis = 256 if quick else 4096            # MSIs per throughput sample
        self.latency = 16 if quick else 200           # one-MSI latency samples per path
        self.reads = 100 if quick else 1000           # guest loads per GITS read sample
        self.batches = 4 if quick else 30             # command batches per vCPU count


class Counters:
    """One u32 per LPI in guest RAM that every vCPU's agent increments (IRQ mode COUNT)."""

    def __init__(self, lab, count: int):
        from kvmits.machine.agent import IrqMode

        self.ram = lab.machine.ram
        self.count = count
        self.table = lab.heap.alloc(4 * count, 0x1000)
        self.ram.fill(self.table, 4 * count, 0)
        self._fmt = struct.Struct(f"<{count}I")
        for cpu in range(lab.cpus):
            lab.agent.irq_mode(cpu, IrqMode.COUNT, self.table, count)

    def total(self) -> int:
        return sum(self._fmt.unpack(self.ram.read(self.table, 4 * self.count)))

    def one(self, index: int) -> int:
        return self.ram.read_u32(self.table + 4 * index)

    def wait_total(self, expected: int, agent) -> None:
        deadline = time.monotonic() + WAIT_TIMEOUT
        while self.total() < expected:
            if time.monotonic() > deadline:
                agent.check()
                raise TimeoutError(f"the guest counted {self.total()} LPIs, {expected} expected, "
                                   f"after {WAIT_TIMEOUT} s")
            time.sleep(0)           # let vCPU threads that exited to Python have the GIL


def _senders(lab, efds) -> dict:
    """path -> send(event): KVM_SIGNAL_MSI (Machine.signal_msi: the kernel's ITS, or the
    userspace ITS's Python translation) and irqfd (compiled routes)."""
    writes = {ev: efds[(MSI_DEVID, ev)].write for ev in range(len(efds))}
    signal = lab.machine.signal_msi
    return {"signal_msi": lambda ev: signal(MSI_DEVID, ev), "irqfd": lambda ev: writes[ev](1)}


def msi_figures(lab, sizes: Sizes, mode: str) -> list[dict]:
    """Figure 1 on `lab` (set up): throughput and latency of each path."""
    events = sizes.events
    lab.its.mapd(MSI_DEVID, max(1, (events - 1).bit_length()))
    for ev in range(events):
        lab.its.mapti(MSI_DEVID, ev, LPI_BASE + ev, ev % lab.cpus)
    counters = Counters(lab, events)
    efds = lab.routes({(MSI_DEVID, ev): FIRST_GSI + ev for ev in range(events)})
    senders = _senders(lab, efds)
    out = []
    for path, send in senders.items():
        # warm-up: one batch (caches, the compiled routes, lazily created threads)
        expected = counters.total()
        for ev in range(events):
            send(ev)
        expected += events
        counters.wait_total(expected, lab.agent)
        rates = []
        for _ in range(sizes.repeat):
            t0 = time.perf_counter()
            for _batch in range(sizes.msis // events):
                for ev in range(events):
                    send(ev)
                expected += events
                counters.wait_total(expected, lab.agent)
            rates.append((sizes.msis // events) * events / (time.perf_counter() - t0))
        out.append(figure(1, "msi_throughput", mode, path, "MSIs/s", "higher", rates, cpus=lab.cpus))
        lat = []
        for i in range(sizes.latency):
            ev = i % events
            before = counters.one(ev)
            deadline = time.monotonic() + WAIT_TIMEOUT
            t0 = time.perf_counter()
            send(ev)
            while counters.one(ev) == before:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{mode} ITS, {path}: event {ev} never reached the guest")
                time.sleep(0)
            lat.append((time.perf_counter() - t0) * 1e6)
        out.append(figure(1, "msi_latency", mode, path, "us", "lower", lat, cpus=lab.cpus))
    if lab.machine.its.live_translation:
        # what of the slow path is the model's translation itself
        translate = lab.machine.its.translate
        n = sizes.msis
        samples = []
        for _ in range(sizes.repeat):
            t0 = time.perf_counter()
            for i in range(n):
                translate(MSI_DEVID, i % events)
            samples.append((time.perf_counter() - t0) / n * 1e6)
        out.append(figure(1, "translate_only", mode, "python", "us", "lower", samples, cpus=lab.cpus))
    return out


def gits_read_figure(lab, sizes: Sizes, mode: str) -> dict:
    """Figure 2: one guest load of GITS_TYPER, timed by the guest (CNTVCT_EL0 / CNTFRQ_EL0)."""
    from kvmits.machine.agent import SysReg

    freq = lab.agent.read_sysreg(0, SysReg.CNTFRQ_EL0)
    addr = lab.its.base + GITS_TYPER
    lab.agent.timed_read(0, addr, 8, 10)                # warm-up
    samples = [lab.agent.timed_read(0, addr, 8, sizes.reads) / freq / sizes.reads * 1e6
               for _ in range(sizes.repeat)]
    served = "python_exit" if lab.machine.its.frame_device is not None else "kernel_mmio"     # who answers the load
    return figure(2, "gits_read", mode, served, "us", "lower",
                  samples, cpus=lab.cpus)


def command_batch_figure(lab, sizes: Sizes, mode: str) -> dict:
    """Figure 3: MAPTI + INT + SYNC in one CWRITER write, until GITS_CREADR has caught up."""
    batches = sizes.batches * sizes.repeat + 1
    lab.its.mapd(BATCH_DEVID, max(1, (batches - 1).bit_length()))
    counters = Counters(lab, 512 + batches)
    its = lab.machine.its
    stops0 = its.stats().get("vcpu_stops")
    samples = []
    for i in range(batches):
        cpu = i % lab.cpus
        t0 = time.perf_counter()
        lab.its.submit(cmd.encode_mapti(BATCH_DEVID, i, LPI_BASE + 512 + i, cpu), cmd.encode_int(BATCH_DEVID, i),
                       cmd.encode_sync(cpu))
        dt = (time.perf_counter() - t0) * 1e3
        if i:                                           # the first one warms up
            samples.append(dt)
    counters.wait_total(batches, lab.agent)             # every INT reached the guest
    extra = {}
    if stops0 is not None:                              # an ITS that stops the vCPUs (the userspace one)
        extra["vcpu_stops_per_batch"] = (its.stats()["vcpu_stops"] - stops0) / batches
    return figure(3, "command_batch", mode, "mapti_int_sync", "ms", "lower", samples, cpus=lab.cpus, **extra)


def run_its(mode: str, sizes: Sizes, progress=None) -> list[dict]:
    """Figures 1-3 for one ITS mode: a 4-vCPU VM (1, 2, 3) and a 1-vCPU VM (3)."""
    from kvmits.lab.its_lab import ItsLab

    out = []
    for cpus in (4, 1):
        if progress:
            progress(f"{mode} ITS, {cpus} vCPU(s)")
        with ItsLab(cpus=cpus, its=mode) as lab:
            lab.setup()
            if cpus == 4:
                out += msi_figures(lab, sizes, mode)
                out.append(gits_read_figure(lab, sizes, mode))
            out.append(command_batch_figure(lab, sizes, mode))
            lab.agent.check()
    return out
