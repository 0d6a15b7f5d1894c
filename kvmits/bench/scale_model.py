"""Part 6 of `kvmits bench`, the figures that need no KVM: the userspace ITS model
(kvmits.its.ItsModel) with N events mapped, N = 10 .. 100,000, and how its costs grow with N.

Each size gets a fresh model on its own guest memory (kvmits.kvm.GuestMemory: anonymous memory,
no VM), programmed as a guest driver programs an ITS: GITS_BASER0/1, GITS_CBASER with the
largest queue (Size = 255: 256 pages, 32768 slots), GITS_CTLR.Enabled, a MAPC per collection,
then MAPD and MAPTI through the queue. N events are spread over devices as a driver spreads
MSI-X vectors (at most EVENTS_PER_DEVICE per DeviceID), over NR_VCPUS collections round-robin,
and over the LPI INTIDs the redistributors allow (8192 up to GICR_PROPBASER.IDbits' bound, 2^16
here as with KVM), shared round-robin once N exceeds them (57344).

Figures (all `its` "user", size = N, size_of "events"):
  scale_commands  (model, commands/s)   a batch of MOVI/INV/INT on events drawn at random from
                  all N (seeded), ended by a SYNC, published by one GITS_CWRITER write and run to
                  completion: from that write until GITS_CREADR == GITS_CWRITER, polling
                  GITS_CREADR as a driver waits (the batch fits the default command_budget, so the
                  CWRITER write runs all of it and the first poll sees it done)
  scale_batch     (model, us)           one small batch MAPTI (a new event) + INT + SYNC, from
                  the GITS_CWRITER write until GITS_CREADR == GITS_CWRITER; a DISCARD + SYNC
                  outside the timing takes the event away again
  scale_translate (model, us)           ItsModel.translate() per call, cycling over all N mapped
                  events in a shuffled order (the loop included)
  scale_memory    (model_state, bytes)  the Python heap the model's state holds for the N events:
                  tracemalloc's traced total on a fresh model before and after the mapping commands
                  (`bytes_per_event` too); one sample per size

Nothing here is compared with a target: the command line computes the growth of each curve
(kvmits.bench.growth) and reports it.
"""

from __future__ import annotations

import gc
import itertools
import random
import time
import tracemalloc

from kvmits.bench import figure
from kvmits.its import TRANSLATED, ItsModel, NullSink, Redistributors
from kvmits.its import abi
from kvmits.its import commands as C
from kvmits.its import registers as R
from kvmits.kvm import GuestMemory

#: vCPUs of the modelled machine; collection n targets vCPU n
NR_VCPUS = 4
#: events per DeviceID at most (a driver's MSI-X vectors of one device)
EVENTS_PER_DEVICE = 1024
#: mapping commands published per GITS_CWRITER write (fewer than the queue's 32767)
MAP_CHUNK = 8192

# guest memory: where a driver would have put its tables (all 64 KiB aligned, as KVM needs)
RAM_BASE = 0x4000_0000
QUEUE_PAGES = R.GITS_CBASER_SIZE_MASK + 1           # GITS_CBASER.Size = 255: the largest queue
#: MAPD's ITT_addr holds bits [51:8] of the ITT's address (IHI 0069 5.3, MAPD): 256-byte aligned ITTs
ITT_ALIGN = 1 << C.ITT_ADDR.lsb


def _align(value: int, to: int) -> int:
    return -(-value // to) * to


class Sizes:
    """How much work each figure does."""

    def __init__(self, quick: bool, repeat: int):
        self.repeat = repeat
        self.events = (10, 100, 1000) if quick else (10, 100, 1_000, 10_000, 100_000)
        self.batch = 256 if quick else 1024         # scale_commands: commands per batch
        self.batches = 5 if quick else 10           # scale_commands: batches (samples) per repeat
        self.latency = 20 if quick else 100         # scale_batch: batches (samples) per repeat
        self.calls = 10_000 if quick else 100_000   # scale_translate: calls per sample, >= one pass
        self.passes = 3                             # scale_translate: samples per repeat


class CountingSink(NullSink):
    """An LPI sink that counts the LPIs made pending and drops the rest."""

    def __init__(self):
        self.pending = 0

    def set_pending(self, intid: int, target: int) -> None:
        self.pending += 1


class ScaleIts:
    """An ItsModel on its own guest memory, sized for `events` events, programmed like a guest
    driver; `map()` then maps the events through the command queue."""

    def __init__(self, events: int):
        if events < 1:
            raise ValueError("events must be >= 1")
        self.events = events
        self.devices = -(-events // EVENTS_PER_DEVICE)
        #: one more DeviceID, with two events, for scale_batch's MAPTI of a new event
        self.batch_devid = self.devices
        self.queue = RAM_BASE
        cbaser = R.encode_cbaser(base=self.queue, pages=QUEUE_PAGES)
        self.queue_size = R.cbaser_queue(cbaser)[1]
        self.slots = self.queue_size // R.ITS_CMD_SIZE
        entry = abi.ABI_REV0_ENTRY_SIZE      # DTE, CTE, ITE (GITS_BASER<n>.Entry_Size, GITS_TYPER.ITT_entry_size)
        self.device_table = self.queue + self.queue_size
        dt_pages = -(-(self.devices + 1) * entry // R.PAGE_64K)
        self.collection_table = self.device_table + dt_pages * R.PAGE_64K
        addr = self.collection_table + R.PAGE_64K       # one page: 8192 collections
        #: per DeviceID: (ITT address, EventID bits, events)
        self.layout: list[tuple[int, int, int]] = []
        for devid in range(self.devices + 1):
            count = min(EVENTS_PER_DEVICE, events - devid * EVENTS_PER_DEVICE) if devid < self.devices else 2
            bits = max(1, (count - 1).bit_length())
            self.layout.append((addr, bits, count))
            addr += _align((1 << bits) * entry, ITT_ALIGN)
        self.memory = GuestMemory(RAM_BASE, _align(addr - RAM_BASE, R.PAGE_64K))
        self.sink = CountingSink()
        self.its = ItsModel(self.memory, self.sink, Redistributors(NR_VCPUS))
        self.lpis = self.its.redistributors.lpi_intid_limit() - R.LPI_BASE
        #: GITS_CREADR polls before a published batch must have completed
        self.max_polls = self.slots // self.its.config.command_budget + 2
        w = self.its.mmio_write
        w(R.GITS_BASER0, 8, R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_DEVICE,
                                           base=self.device_table, pages=dt_pages))
        w(R.GITS_BASER(1), 8, R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_COLLECTION,
                                             base=self.collection_table, pages=1))
        w(R.GITS_CBASER, 8, cbaser)
        w(R.GITS_CTLR, 4, R.GITS_CTLR_ENABLED)
        if not self.its.enabled:
            raise RuntimeError(f"the ITS did not enable: {self.its.stats()}")

    def close(self) -> None:
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the events ---------------------------------------------------------------------------
    def event(self, i: int) -> tuple[int, int]:
        """(DeviceID, EventID) of event i (0 <= i < events)."""
        return divmod(i, EVENTS_PER_DEVICE)

    def ite(self, i: int) -> tuple[int, int]:
        """(pINTID, ICID) event i is mapped to: LPIs and collections round-robin."""
        return R.LPI_BASE + i % self.lpis, i % NR_VCPUS

    def mapping_commands(self):
        """What the driver issues: a MAPC per collection, per device MAPD + its MAPTIs, a MAPD
        of the batch device, a SYNC."""
        for icid in range(NR_VCPUS):
            yield C.encode_mapc(icid, icid)
        for devid, (itt, bits, count) in enumerate(self.layout):
            yield C.encode_mapd(devid, itt, bits)
            if devid == self.batch_devid:
                continue
            base = devid * EVENTS_PER_DEVICE
            for eventid in range(count):
                intid, icid = self.ite(base + eventid)
                yield C.encode_mapti(devid, eventid, intid, icid)
        yield C.encode_sync(0)

    def mapping_command_count(self) -> int:
        return NR_VCPUS + len(self.layout) + self.events + 1

    def map(self) -> None:
        """Map every event through the command queue, MAP_CHUNK commands per GITS_CWRITER write."""
        commands = self.mapping_commands()
        while True:
            chunk = b"".join(itertools.islice(commands, MAP_CHUNK))
            if not chunk:
                break
            self.publish(chunk)
        self.check_errors("mapping")

    # -- the command queue, as the driver sees it -----------------------------------------------
    def write(self, data: bytes) -> int:
        """Write commands into the queue at GITS_CWRITER (wrapping); returns the new
        GITS_CWRITER, not written yet."""
        n = len(data) // R.ITS_CMD_SIZE
        if len(data) % R.ITS_CMD_SIZE or not 0 < n < self.slots:
            raise ValueError(f"{len(data)} bytes: 1 to {self.slots - 1} whole commands fit the queue")
        cwriter = self.its.cwriter
        first = min(len(data), self.queue_size - cwriter)
        self.memory.write(self.queue + cwriter, data[:first])
        if first < len(data):
            self.memory.write(self.queue, data[first:])
        return (cwriter + len(data)) % self.queue_size

    def kick(self, cwriter: int) -> int:
        """Write GITS_CWRITER and poll GITS_CREADR until it equals it; returns the nanoseconds
        from the write to the completion seen."""
        write, read = self.its.mmio_write, self.its.mmio_read
        polls = self.max_polls
        t0 = time.perf_counter_ns()
        write(R.GITS_CWRITER, 8, cwriter)
        while read(R.GITS_CREADR, 8) != cwriter:
            polls -= 1
            if not polls:
                raise RuntimeError(f"GITS_CREADR {self.its.creadr:#x} does not reach GITS_CWRITER "
                                   f"{cwriter:#x}: {self.its.stats()}")
        return time.perf_counter_ns() - t0

    def publish(self, data: bytes) -> int:
        return self.kick(self.write(data))

    def check_errors(self, what: str) -> None:
        """A figure of erroneous commands would measure the wrong thing: none may fail."""
        if self.its.error_counts:
            raise RuntimeError(f"{what}: commands failed: {self.its.stats()['errors_by_code']}")

    def check_mapping(self) -> None:
        """Every event translates to its ITE, and the mapping came through the queue."""
        its = self.its
        expected = self.mapping_command_count()
        if its.ite_count != self.events or its.commands_processed != expected or its.creadr != its.cwriter:
            raise RuntimeError(f"mapping {self.events} events: {its.ite_count} ITEs after "
                               f"{its.commands_processed} commands ({expected} issued)")
        for i in range(self.events):
            t = its.translate(*self.event(i))
            intid, icid = self.ite(i)
            if t.reason != TRANSLATED or (t.intid, t.icid, t.target) != (intid, icid, icid):
                raise RuntimeError(f"event {i} {self.event(i)} translates to {t}")


def heap_of_mapping(s: ScaleIts) -> int:
    """Bytes of Python heap still held after `s.map()`: the model's state for its events.

    tracemalloc traces the mapping (started just before it, unless something traces already)
    and the traced total is read before and after, garbage collected: the difference is what
    the commands left allocated. A snapshot per size would say where (model.py: ITEs, devices,
    the ICID index; the layouts' code: the ints they decoded) but costs a second or more per
    10^5 events to take and compare; the totals cost nothing."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        s.map()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        if started:
            tracemalloc.stop()
    return after - before


def _commands_samples(s: ScaleIts, sizes: Sizes) -> list[float]:
    """scale_commands: MOVI/INV/INT on events drawn from all N, a SYNC last; commands/s."""
    rng = random.Random(f"scale_commands {s.events}")
    batches = []
    for _ in range(sizes.repeat * sizes.batches):
        cmds = []
        for _ in range(sizes.batch - 1):
            devid, eventid = s.event(rng.randrange(s.events))
            kind = rng.randrange(3)
            if kind == 0:
                cmds.append(C.encode_movi(devid, eventid, rng.randrange(NR_VCPUS)))
            elif kind == 1:
                cmds.append(C.encode_inv(devid, eventid))
            else:
                cmds.append(C.encode_int(devid, eventid))
        cmds.append(C.encode_sync(0))
        batches.append(b"".join(cmds))
    samples = []
    for data in batches:
        ns = s.kick(s.write(data))
        samples.append(sizes.batch / (ns / 1e9))
    s.check_errors("scale_commands")
    return samples


def _batch_samples(s: ScaleIts, sizes: Sizes) -> list[float]:
    """scale_batch: MAPTI of a new event + INT + SYNC, in microseconds; DISCARD it untimed."""
    devid = s.batch_devid
    batch = C.encode_mapti(devid, 0, R.LPI_BASE, 0) + C.encode_int(devid, 0) + C.encode_sync(0)
    undo = C.encode_discard(devid, 0) + C.encode_sync(0)
    samples = []
    for _ in range(sizes.repeat * sizes.latency):
        pending = s.sink.pending
        ns = s.kick(s.write(batch))
        samples.append(ns / 1e3)
        if s.sink.pending != pending + 1 or s.its.ite_count != s.events + 1:
            raise RuntimeError(f"scale_batch: the INT was not delivered: {s.its.stats()}")
        s.publish(undo)
    s.check_errors("scale_batch")
    return samples


def _translate_samples(s: ScaleIts, sizes: Sizes) -> tuple[list[float], int]:
    """scale_translate: translate() over all N events, shuffled; microseconds per call."""
    order = [s.event(i) for i in range(s.events)]
    random.Random(f"scale_translate {s.events}").shuffle(order)
    calls = order * -(-sizes.calls // s.events)
    translate = s.its.translate
    samples = []
    for _ in range(sizes.repeat * sizes.passes):
        t0 = time.perf_counter_ns()
        for devid, eventid in calls:
            translate(devid, eventid)
        samples.append((time.perf_counter_ns() - t0) / 1e3 / len(calls))
    return samples, len(calls)


def model_figures(sizes: Sizes, progress=None) -> list[dict]:
    """The four model curves, one figure per size each (see the module's docstring)."""
    out = []
    for n in sizes.events:
        with ScaleIts(n) as s:
            if progress:
                progress(f"part 6: ITS model, {n:,} events on {s.devices} device(s)")
            heap = heap_of_mapping(s)
            s.check_mapping()
            common = {"size": n, "size_of": "events", "cpus": NR_VCPUS, "devices": s.devices}
            out.append(figure(6, "scale_commands", "user", "model", "commands/s", "higher",
                              _commands_samples(s, sizes), batch=sizes.batch, **common))
            out.append(figure(6, "scale_batch", "user", "model", "us", "lower",
                              _batch_samples(s, sizes), **common))
            samples, calls = _translate_samples(s, sizes)
            out.append(figure(6, "scale_translate", "user", "model", "us", "lower", samples,
                              calls=calls, **common))
            out.append(figure(6, "scale_memory", "user", "model_state", "bytes", "lower", [heap],
                              bytes_per_event=heap / n, **common))
    return out
