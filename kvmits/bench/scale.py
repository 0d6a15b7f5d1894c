"""Part 6 of `kvmits bench` on arm64 KVM: how each ITS's cost grows with the work, both ITSes
in the same run (the model's own curves, which need no KVM, are kvmits.bench.scale_model).

Against the number of mapped events (10 to 10^5, on EVENTS_CPUS vCPUs; spread over devices of
EVENTS_PER_DEVICE events, as a driver would):
  scale_map       the time per event of mapping the events added since the previous size
                  (MAPD + MAPTI through the 1 MiB command queue)
  scale_batch     the latency of one MOVI + INT + SYNC batch (one GITS_CWRITER write)
  scale_commands  the rate of a batch of MOVI/INV commands on events drawn from all mapped ones
  scale_delivery  end-to-end MSIs/s to a guest counting LPIs: by irqfd (routes to events drawn
                  from all mapped ones, up to KVM's 4096 GSIs) and by the slow path
                  (Machine.signal_msi: KVM_SIGNAL_MSI, or the userspace ITS's Python translation)
  scale_routes_memory  the Python heap of the compiled routes (tracemalloc)
Against the number of vCPUs (1 to 64):
  scale_batch     the same batch's latency
  scale_commands  the same command rate (the userspace ITS stops every vCPU per batch)
  scale_vcpu_stop how long the userspace ITS held every vCPU out of KVM_RUN per batch (the
                  kernel's ITS stops nobody: it has no such figure)
  lpi_stress      in the style of KVM's vgic_lpi_stress selftest: D device threads write their
                  irqfds without waiting for delivery, the guest counts; LPIs/s taken

The LPIs are 8192..65535 (GITS_TYPER.IDbits 16, as KVM's ITS): past 57344 events, events share
LPIs round-robin, which KVM and the model allow (one interrupt, several ITEs naming it).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import tracemalloc

from kvmits.bench import figure
from kvmits.bench.its import Counters
from kvmits.its import commands as cmd
from kvmits.its.registers import LPI_BASE
from kvmits.machine.its.routes import MAX_GSI

PART = 6
#: vCPUs of the events curves
EVENTS_CPUS = 4
#: events per device when mapping N events (MAPD Size 10: a 8 KiB ITT)
EVENTS_PER_DEVICE = 1024
#: distinct LPIs: INTIDs 8192 .. 2**16 - 1
NR_LPIS = (1 << 16) - LPI_BASE
#: the events curves' devices are 0x100, 0x101, ...; the batch's spare device follows
FIRST_DEVID = 0x100
#: the guest's command queue for this part: the largest, 1 MiB (GITS_CBASER.Size = 255)
QUEUE_SIZE = 256 * 0x1000
#: commands per submission while mapping, at most (a device's MAPTIs go in one submission, a
#: MAPD between devices): KVM runs a batch inside the GITS_CWRITER store
MAP_CHUNK = 4096
#: how long one guest access (a GITS_CWRITER store among them) may take
ACCESS_TIMEOUT = 900.0
FIRST_GSI = 32
MAX_ROUTES = MAX_GSI - FIRST_GSI
#: MSIs per delivery round, each to a distinct LPI (the smallest curve point maps 10 events)
ROUND = 10
#: device threads' events in lpi_stress, each on its own LPI
STRESS_EVENTS = 16
STRESS_DEVID = 0x80
#: lpi_stress's LPIs start here, past those of the vCPU curves' few mapped events
STRESS_LPI = LPI_BASE + 1024


class Sizes:
    """How much work part 6 does."""

    def __init__(self, quick: bool, repeat: int):
        self.repeat = repeat
        self.events = (10, 1000) if quick else (10, 100, 1_000, 10_000, 100_000)
        self.vcpus = (1, 4) if quick else (1, 4, 16, 64)
        self.stress_devices = (1, 2) if quick else (1, 4)
        self.stress_seconds = 0.5 if quick else 2.0
        self.batches = 3 if quick else 10               # batches per latency sample
        self.batch_commands = 64 if quick else 256       # commands of one scale_commands batch
        self.msis = 200 if quick else 1000               # MSIs per delivery sample


def _lpi(index: int) -> int:
    """The LPI of the index-th mapped event (round-robin once there are more events than LPIs)."""
    return LPI_BASE + index % NR_LPIS


def _event(index: int) -> tuple[int, int]:
    """(DeviceID, EventID) of the index-th mapped event."""
    return FIRST_DEVID + index // EVENTS_PER_DEVICE, index % EVENTS_PER_DEVICE


class EventSet:
    """N events mapped through the guest's command queue, grown in place from size to size."""

    def __init__(self, lab):
        self.lab = lab
        self.count = 0

    def grow(self, n: int, progress=None) -> None:
        """Map events count .. n-1 (MAPD per device, MAPTIs in MAP_CHUNK batches)."""
        lab = self.lab
        pending: list[bytes] = []
        t0 = time.monotonic()
        bits = (EVENTS_PER_DEVICE - 1).bit_length()
        for i in range(self.count, n):
            devid, ev = _event(i)
            if ev == 0:
                if pending:                     # MAPD allocates the ITT: send what came before
                    lab.its.submit(*pending, timeout=ACCESS_TIMEOUT)
                    pending = []
                if progress and i and i % (16 * EVENTS_PER_DEVICE) == 0:
                    progress(f"  {i:,} events mapped ({time.monotonic() - t0:.0f} s)")
                lab.its.mapd(devid, bits)
            pending.append(cmd.encode_mapti(devid, ev, _lpi(i), i % lab.cpus))
            if len(pending) == MAP_CHUNK:
                lab.its.submit(*pending, timeout=ACCESS_TIMEOUT)
                pending = []
        if pending:
            lab.its.submit(*pending, cmd.encode_sync(0), timeout=ACCESS_TIMEOUT)
        self.count = max(self.count, n)

    def sample(self, k: int, rng: random.Random) -> list[int]:
        """Indices of up to k mapped events with distinct LPIs, drawn from all of them."""
        pool = range(min(self.count, NR_LPIS))      # the first NR_LPIS events have distinct LPIs
        picks = rng.sample(pool, min(k, len(pool)))
        # the same LPIs, reached through events anywhere in the mapped range
        return [p + NR_LPIS * rng.randrange(1 + (self.count - 1 - p) // NR_LPIS) for p in picks]


class StopTimes:
    """The userspace ITS's vCPU stops (seconds from the pause's start to the resume: `held`
    of UserMachineIts.stop_observers, which includes `wait`), from its stop observers."""

    def __init__(self, its):
        self.samples: list[float] = []
        self._observers = getattr(its, "stop_observers", None)
        if self._observers is not None:
            self._observers.append(self._seen)

    def _seen(self, wait: float, held: float, commands: int, vcpus: int) -> None:
        self.samples.append(held)

    def close(self) -> None:
        if self._observers is not None:
            self._observers.remove(self._seen)


def _batch_latency(lab, events: EventSet, sizes: Sizes, rng: random.Random, stops: StopTimes):
    """Per-sample medians of one MOVI + INT + SYNC batch (ms) and of its vCPU stop (ms)."""
    lat, held = [], []
    for _ in range(sizes.repeat):
        one, stop = [], []
        for _ in range(sizes.batches):
            devid, ev = _event(rng.randrange(events.count))
            cpu = rng.randrange(lab.cpus)
            before = len(stops.samples)
            t0 = time.perf_counter()
            lab.its.submit(cmd.encode_movi(devid, ev, cpu), cmd.encode_int(devid, ev), cmd.encode_sync(cpu))
            one.append((time.perf_counter() - t0) * 1e3)
            stop += [s * 1e3 for s in stops.samples[before:]]
        lat.append(statistics.median(one))
        if stop:
            held.append(statistics.median(stop))
    return lat, held


def _command_rate(lab, events: EventSet, sizes: Sizes, rng: random.Random) -> list[float]:
    """Commands/s of batches of MOVI and INV on events drawn from all mapped ones."""
    rates = []
    for _ in range(sizes.repeat):
        batch = []
        for j in range(sizes.batch_commands - 1):
            devid, ev = _event(rng.randrange(events.count))
            batch.append(cmd.encode_movi(devid, ev, rng.randrange(lab.cpus)) if j % 2
                         else cmd.encode_inv(devid, ev))
        batch.append(cmd.encode_sync(0))
        t0 = time.perf_counter()
        lab.its.submit(*batch, timeout=ACCESS_TIMEOUT)
        rates.append(len(batch) / (time.perf_counter() - t0))
    return rates


def _delivery(lab, counters: Counters, send, pool: list, sizes: Sizes, rng: random.Random) -> list[float]:
    """MSIs/s in rounds of ROUND MSIs to keys drawn from `pool` (whose LPIs are distinct), each
    round waited for by the guest's count: the same work per round at every size, while the
    pool, and with it what KVM's translation cache must hold, grows with the mapping."""
    k = min(ROUND, len(pool))
    rounds = max(1, sizes.msis // k)
    expected = counters.total()
    for key in pool[:k]:                                # warm-up round
        send(key)
    expected += k
    counters.wait_total(expected, lab.agent)
    rates = []
    for _ in range(sizes.repeat):
        draws = [rng.sample(pool, k) for _ in range(rounds)]
        t0 = time.perf_counter()
        for keys in draws:
            for key in keys:
                send(key)
            expected += k
            counters.wait_total(expected, lab.agent)
        rates.append(rounds * k / (time.perf_counter() - t0))
    return rates


def _routes_memory(lab, table: dict) -> tuple[dict, float]:
    """Compile `table` into KVM's routes, on a lab without routes; the Python heap that took
    (bytes)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        efds = lab.routes(table)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return efds, float(after - before)


def events_figures(mode: str, sizes: Sizes, progress) -> list[dict]:
    """The events curves for one ITS, on one EVENTS_CPUS-vCPU VM whose mapping grows."""
    from kvmits.lab.its_lab import ItsLab

    out = []
    rng = random.Random(6)
    with ItsLab(cpus=EVENTS_CPUS, its=mode, queue_size=QUEUE_SIZE, timeout=ACCESS_TIMEOUT) as lab:
        lab.setup()
        events = EventSet(lab)
        stops = StopTimes(lab.machine.its)
        try:
            for n in sizes.events:
                progress(f"{mode} ITS, {n} mapped events")
                tag = {"size": n, "size_of": "events", "fixed": f"vcpus={EVENTS_CPUS}"}
                new = n - events.count
                t0 = time.perf_counter()
                events.grow(n, progress)
                dt = time.perf_counter() - t0
                # the cost of one more mapped event: MAPD/MAPTI of the events added since the last size
                out.append(figure(PART, "scale_map", mode, "mapti", "us", "lower", [dt / new * 1e6], cpus=lab.cpus,
                                  seconds=dt, events_added=new, **tag))
                counters = Counters(lab, min(n, NR_LPIS))     # the guest counts every LPI
                lat, _ = _batch_latency(lab, events, sizes, rng, stops)
                out.append(figure(PART, "scale_batch", mode, "movi_int_sync", "ms", "lower", lat,
                                  cpus=lab.cpus, **tag))
                out.append(figure(PART, "scale_commands", mode, "queue", "commands/s", "higher",
                                  _command_rate(lab, events, sizes, rng), cpus=lab.cpus, **tag))
                picks = events.sample(MAX_ROUTES, rng)
                table = {_event(i): FIRST_GSI + j for j, i in enumerate(picks)}
                efds, heap = _routes_memory(lab, table)
                out.append(figure(PART, "scale_routes_memory", mode, "python_heap", "bytes", "lower", [heap],
                                  cpus=lab.cpus, routes=len(table), **tag))
                writes = [efds[key].write for key in table]
                out.append(figure(PART, "scale_delivery", mode, "irqfd", "MSIs/s", "higher",
                                  _delivery(lab, counters, lambda w: w(1), writes, sizes, rng), cpus=lab.cpus,
                                  routes=len(table), **tag))
                signal = lab.machine.signal_msi
                slow = [_event(i) for i in events.sample(sizes.msis, rng)]
                out.append(figure(PART, "scale_delivery", mode, "signal_msi", "MSIs/s", "higher",
                                  _delivery(lab, counters, lambda key: signal(*key), slow, sizes, rng),
                                  cpus=lab.cpus, **tag))
                lab.routes({})      # no routes to recompile in the next size's batches
            lab.agent.check()
        finally:
            stops.close()
    return out


def _stress(lab, counters: Counters, efds: dict, devices: int, seconds: float) -> float:
    """LPIs/s the guest took while `devices` threads wrote their irqfds without waiting."""
    mine = [[efds[(STRESS_DEVID + d, ev)].write for ev in range(STRESS_EVENTS)] for d in range(devices)]
    stop = threading.Event()

    def inject(writes):
        while not stop.is_set():
            for w in writes:
                w(1)

    threads = [threading.Thread(target=inject, args=(w,), name=f"lpi-stress{d}", daemon=True)
               for d, w in enumerate(mine)]
    before = counters.total()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    taken = counters.total() - before                   # what arrived while the devices wrote
    return taken / (time.perf_counter() - t0)


def vcpus_figures(mode: str, sizes: Sizes, progress) -> list[dict]:
    """The vCPU curves for one ITS: one VM per vCPU count."""
    from kvmits.lab.its_lab import ItsLab

    out = []
    rng = random.Random(64)
    for cpus in sizes.vcpus:
        progress(f"{mode} ITS, {cpus} vCPU(s)")
        with ItsLab(cpus=cpus, its=mode, timeout=120) as lab:
            lab.setup()
            events = EventSet(lab)
            events.grow(min(sizes.events))
            # lpi_stress's devices: device d's events on LPIs of their own, spread over the vCPUs
            devices = max(sizes.stress_devices)
            for d in range(devices):
                lab.its.mapd(STRESS_DEVID + d, (STRESS_EVENTS - 1).bit_length())
                lab.its.submit(*(cmd.encode_mapti(STRESS_DEVID + d, ev, STRESS_LPI + d * STRESS_EVENTS + ev,
                                                  (d * STRESS_EVENTS + ev) % cpus) for ev in range(STRESS_EVENTS)),
                               cmd.encode_sync(0))
            # every LPI is counted by the guest, without an exit (the batches' INTs too)
            counters = Counters(lab, STRESS_LPI - LPI_BASE + devices * STRESS_EVENTS)
            stops = StopTimes(lab.machine.its)
            tag = {"size": cpus, "size_of": "vcpus", "fixed": f"events={events.count}"}
            try:
                lat, held = _batch_latency(lab, events, sizes, rng, stops)
            finally:
                stops.close()
            out.append(figure(PART, "scale_batch", mode, "movi_int_sync", "ms", "lower", lat, cpus=cpus, **tag))
            out.append(figure(PART, "scale_commands", mode, "queue", "commands/s", "higher",
                              _command_rate(lab, events, sizes, rng), cpus=cpus, **tag))
            if held:
                out.append(figure(PART, "scale_vcpu_stop", mode, "pause", "ms", "lower", held, cpus=cpus, **tag))
            efds = lab.routes({(STRESS_DEVID + d, ev): FIRST_GSI + d * STRESS_EVENTS + ev
                               for d in range(devices) for ev in range(STRESS_EVENTS)})
            for d in sizes.stress_devices:
                rates = [_stress(lab, counters, efds, d, sizes.stress_seconds) for _ in range(sizes.repeat)]
                out.append(figure(PART, "lpi_stress", mode, "irqfd", "LPIs/s", "higher", rates, cpus=cpus,
                                  size=cpus, size_of="vcpus", fixed=f"devices={d}"))
            lab.agent.check()
    return out


def run_scale(sizes: Sizes, progress) -> list[dict]:
    """Part 6's KVM figures, each ITS in turn."""
    out = []
    for mode in ("kernel", "user"):
        out += events_figures(mode, sizes, progress)
        out += vcpus_figures(mode, sizes, progress)
    return out
