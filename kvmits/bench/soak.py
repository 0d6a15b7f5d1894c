"""`kvmits soak` (issue 15, part 4): a Linux guest's block I/O with checksums and IRQ affinity
churn for a long time, per ITS, and what the run did to the VMM.

The guest is the nested Linux guest of part 5 (kvmits.bench.linux, kvmits.lab.linux_guest) on
CPUS vCPUs with one virtio-blk disk, vda, of two queues on one shared MSI-X vector
(Disk(vectors=2): the vector whose affinity Linux lets /proc/irq/N/smp_affinity_list move, each
move a MOVI + SYNC from Linux's ITS driver). Its job runs `iogen --verify` (guests/linux/iogen.c):
every block written once, then `minutes` of random reads and writes at queue depth `qd` while
the vector moves `churn_hz` times a second, then every block read back; each read is checked
against the exact block iogen last wrote there. iogen prints a progress line every PROGRESS_S
seconds (KVMITS-IOGEN-PROGRESS), and a report at the end (KVMITS-IOGEN).

The host side stays small, as it runs in the testbed's emulated Python: the console's bytes are
only appended under a lock on the vCPU thread that writes them (ConsoleTap), and the main
thread wakes every POLL_S to parse the new lines (SoakMonitor), sample this process (the VMM:
RSS, fds, threads) every SAMPLE_S, and stop a guest whose progress lines stopped. A run fails on
any I/O error, corrupt block, stalled or lost I/O, failed affinity move, a progress gap longer
than the stall bound, or a guest that did not run its job to the end (failures()).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmits.bench import linux
from kvmits.errors import KvmitsError
from kvmits.lab.linux_guest import TAIL_LINES, GuestReport, LinuxGuest, LinuxGuestError

FORMAT = "kvmits-soak"
VERSION = 1
#: the shared vector of vda (the only disk), as /proc/interrupts names it
IRQ = re.compile(r"virtio0-virtqueues$")
IRQ_NAME = "virtio0-virtqueues"
#: 64 MiB: 16384 blocks of 4 KiB, each written and read back by the fill and the sweep (about
#: ten seconds each in the testbed), and hit dozens of times in ten minutes of random I/O
DISK_BYTES = 64 << 20
PROGRESS_MARK = "KVMITS-IOGEN-PROGRESS "
#: guest seconds between progress lines
PROGRESS_S = 10
#: host seconds between samples of the VMM process, and the width of a throughput bucket
SAMPLE_S = 60
BUCKET_S = 60
#: how often the main thread wakes: parse, sample, check for a hung guest
POLL_S = 1.0
#: host seconds from KVM_RUN to the first progress line (boot, insmod, iogen's first 10 s)
FIRST_PROGRESS_S = 300
#: host seconds without a progress line after which the guest counts as hung: at least this,
#: and six progress periods (a slow spell of the testbed's host stretches one by 2-3x)
SILENCE_MIN_S = 120.0
#: one run's time beyond its I/O minutes: boot, fill, sweep, drain, power-off (generous: the
#: testbed's times move by 2-3x with the host's load)
RUN_OVERHEAD_S = 300
#: the console kept for the report of a guest that went wrong: the first and last bytes
CONSOLE_HEAD = 1 << 20
CONSOLE_TAIL = 1 << 20
#: a console line longer than this is cut (a guest cannot grow the host's memory with one)
LINE_MAX = 4096
#: the numbers of a progress line (all of them there, and numbers, or the line is malformed)
PROGRESS_NUMBERS = ("t", "ios", "reads", "writes", "errors", "corrupt", "stalled", "inflight", "stalled_now",
                    "oldest_ms", "moves", "move_failures")
#: the numbers of the final report that the soak reads, at its top level, in "verify" and in
#: "churn" (null for a run without churn)
FINAL_NUMBERS = ("seconds", "ios", "errors", "lost", "stalled", "iops")
VERIFY_NUMBERS = ("blocks", "reads", "writes", "fill_writes", "sweep_reads", "unverified", "corrupt", "stale",
                  "misdirected", "damaged")
CHURN_NUMBERS = ("moves", "move_failures")
#: the phase of a VMM sample taken after the machine ended (not compared: its threads are gone)
AFTER = "after-exit"
#: seconds the job waits after iogen's report, so that the host's next poll samples the VMM
#: while the machine still runs (POLL_S apart, with room for the testbed's slow spells)
END_WAIT_S = 5
#: the VMM's private memory (RssAnon) counts as flat if it grew by at most this over the
#: steady part of the run (the Python heap breathes by a few hundred KiB)
FLAT_ANON_KB = 2048


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 10.0
    qd: int = 16
    churn_hz: float = linux.CHURN_HZ
    stall_s: float = 10.0
    progress_s: float = PROGRESS_S
    disk_bytes: int = DISK_BYTES
    seed: int = 1

    def __post_init__(self):
        if not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, not {self.minutes}")
        if not 1 <= self.qd <= 4096:                 # iogen's MAX_QD
            raise ValueError(f"qd must be in 1..4096, not {self.qd}")
        if self.churn_hz < 0:
            raise ValueError(f"churn_hz must be >= 0 (0: no churn), not {self.churn_hz}")
        if not self.stall_s > 0 or not self.progress_s > 0:
            raise ValueError("stall_s and progress_s must be > 0")

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def run_limit_s(self) -> float:
        """Host seconds one run may take before it is stopped."""
        return self.seconds + RUN_OVERHEAD_S

    @property
    def silence_s(self) -> float:
        """Host seconds without a progress line after which the guest counts as hung."""
        return max(6 * self.progress_s, SILENCE_MIN_S)


def testbed_timeout(config: SoakConfig, runs: int) -> int:
    """tools/testbed --timeout for `runs` soak runs: theirs plus the testbed's own boot."""
    return int(runs * config.run_limit_s + RUN_OVERHEAD_S)


def job(config: SoakConfig, cpus: int = linux.CPUS) -> str:
    """The guest's job: /proc/interrupts, iogen --verify with churn, /proc/interrupts; its exit
    status is iogen's (2 also when the shared vector is not found)."""
    iogen = (f"/{linux.IOGEN_GUEST_PATH} /dev/vda --verify --qd {config.qd} --seconds {config.seconds:g} "
             f"--progress {config.progress_s:g} --stall-seconds {config.stall_s:g} --seed {config.seed}")
    find = ""
    if config.churn_hz:
        iogen += f' --churn "$irq" --churn-hz {config.churn_hz:g} --cpus {cpus}'
        find = (f"irq=$(grep -m1 '{IRQ_NAME}' /proc/interrupts | cut -d: -f1 | tr -d ' ')\n"
                f'[ -n "$irq" ] || {{ echo "KVMITS-SOAK no {IRQ_NAME} in /proc/interrupts"; exit 2; }}\n')
    return f"""
{linux.IRQS_SH}
{find}irqs start
{iogen}
rc=$?
sleep {END_WAIT_S}
irqs end
exit $rc
"""


# -- the console ------------------------------------------------------------------------------------
class ConsoleTap:
    """The machine's console stream. write() runs on the vCPU thread of the PL011's store, so it
    only appends to a buffer; take() hands the new bytes to the main thread. The first
    CONSOLE_HEAD and the last CONSOLE_TAIL bytes are kept for text()."""

    def __init__(self, head: int = CONSOLE_HEAD, tail: int = CONSOLE_TAIL):
        self._lock = threading.Lock()
        self._new = bytearray()
        self._head_max, self._tail_max = head, tail
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def write(self, data: bytes) -> int:
        with self._lock:
            self._new += data
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        with self._lock:
            data, self._new = bytes(self._new), bytearray()
        room = self._head_max - len(self.head)
        self.head += data[:max(room, 0)]
        self.tail += data[max(room, 0):]
        if len(self.tail) > self._tail_max:
            cut = len(self.tail) - self._tail_max
            self.dropped += cut
            del self.tail[:cut]
        return data

    def text(self) -> str:
        between = f"\n[... {self.dropped} console bytes not kept ...]\n".encode() if self.dropped else b""
        return (bytes(self.head) + between + bytes(self.tail)).decode("utf-8", "replace")


class SoakMonitor:
    """The job's console lines, parsed as they come: iogen's progress lines and final report,
    and the /proc/interrupts sections. Pure: fed bytes and the host time since KVM_RUN. A
    malformed line from the guest is kept in `bad_lines`, never raised."""

    def __init__(self, config: SoakConfig):
        self.config = config
        self.progress: list[dict] = []
        self.final: dict | None = None
        self.sections = linux.InterruptTables()
        self.bad_lines: list[str] = []
        self.notes: list[str] = []           # KVMITS-SOAK lines of the job
        self.last_progress_at: float | None = None
        self._partial = bytearray()

    def feed(self, data: bytes, now: float) -> list[dict]:
        """Take console bytes; the progress lines they completed."""
        new = []
        for byte_line in self._lines(data):
            line = byte_line.decode("utf-8", "replace").strip("\r")
            got = self.line(line, now)
            if got is not None:
                new.append(got)
        return new

    def _lines(self, data: bytes):
        """The lines `data` completes (each cut at LINE_MAX bytes); keeps the unfinished one."""
        start = 0
        while True:
            end = data.find(b"\n", start)
            stop = len(data) if end < 0 else end
            room = LINE_MAX - len(self._partial)
            if room > 0:
                self._partial += data[start:min(stop, start + room)]
            if end < 0:
                return
            line, self._partial = bytes(self._partial), bytearray()
            start = end + 1
            yield line

    def line(self, line: str, now: float) -> dict | None:
        """One console line; the progress record if it was a progress line."""
        if self.sections.line(line):
            return None
        if line.startswith(PROGRESS_MARK):
            record = self._json(line, PROGRESS_MARK)
            if record is None:
                return None
            if not _numbers(record, PROGRESS_NUMBERS) or not isinstance(record.get("phase"), str):
                self.bad_lines.append(line[:200])
                return None
            record["host_t"] = round(now, 3)
            self.progress.append(record)
            self.last_progress_at = now
            return record
        if line.startswith(linux.IOGEN_MARK):
            record = self._json(line, linux.IOGEN_MARK)
            if record is None:
                return None
            churn, verify = record.get("churn"), record.get("verify")
            if (_numbers(record, FINAL_NUMBERS) and _numbers(verify, VERIFY_NUMBERS)
                    and isinstance(verify.get("corrupt_blocks"), list)
                    and (churn is None or _numbers(churn, CHURN_NUMBERS))
                    and isinstance(record.get("lat_us"), dict)):
                self.final = record
            else:
                self.bad_lines.append(line[:200])
        elif line.startswith("KVMITS-SOAK "):
            self.notes.append(line[len("KVMITS-SOAK "):])
        return None

    def _json(self, line: str, mark: str) -> dict | None:
        try:
            record = json.loads(line[len(mark):])
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self.bad_lines.append(line[:200])
            return None
        return record

    @property
    def phase(self) -> str | None:
        return self.progress[-1].get("phase") if self.progress else None

    def hung(self, now: float) -> str | None:
        """Why the guest counts as hung at host time `now` (s since KVM_RUN), or None."""
        if self.final is not None:
            return None                       # iogen is done; the job's end is the machine's
        if self.last_progress_at is None:
            if now > FIRST_PROGRESS_S:
                return (f"no progress line from iogen within {FIRST_PROGRESS_S} s of KVM_RUN: the guest did "
                        f"not boot to its job, or iogen did not start")
            return None
        silent = now - self.last_progress_at
        if silent > self.config.silence_s:
            return (f"no progress line from iogen for {silent:.0f} s (one every {self.config.progress_s:g} s "
                    f"expected): the guest or its I/O is hung")
        return None


def _numbers(record, keys) -> bool:
    """record is a dict whose `keys` are all numbers (JSON's: not true/false)."""
    return isinstance(record, dict) and all(
        isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) for k in keys)


# -- the VMM process ---------------------------------------------------------------------------------
def process_sample(proc: str = "/proc/self") -> dict:
    """This process's memory and handles (kB from /proc/PID/status): VmRSS, and of it RssAnon
    (private memory: the Python heap, thread stacks) and RssShmem (shared anonymous memory:
    guest RAM, which GuestMemory maps MAP_SHARED, so the guest's touching its RAM is kept out of
    RssAnon); its open fds and its threads."""
    fields = {"VmRSS": "rss_kb", "RssAnon": "anon_kb", "RssFile": "file_kb", "RssShmem": "shmem_kb",
              "Threads": "threads"}
    out = {}
    with open(os.path.join(proc, "status")) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                out[fields[name]] = int(value.split()[0])
    out["fds"] = len(os.listdir(os.path.join(proc, "fd")))
    return out


def process_summary(samples: list[dict]) -> dict:
    """Start and end of the VMM's figures, and whether they stayed flat over the steady part of
    the run: from the first sample taken in iogen's mixed phase (the boot and the fill allocate)
    to the last one taken while the machine ran (its vCPU threads end with it)."""
    if not samples:
        return {"samples": 0}
    steady = next((s for s in samples if s.get("phase") == "mixed"), samples[0])
    end = next((s for s in reversed(samples) if s.get("phase") != AFTER), samples[-1])
    out = {"start": samples[0], "steady": steady, "end": end, "samples": len(samples)}
    growth = {k: end[k] - steady[k] for k in ("rss_kb", "anon_kb", "shmem_kb", "fds", "threads")
              if k in end and k in steady}
    out["growth"] = growth
    out["flat"] = {"fds": growth.get("fds") == 0, "threads": growth.get("threads") == 0,
                   "anon": growth.get("anon_kb", 0) <= FLAT_ANON_KB}
    return out


# -- the ITS and the devices ---------------------------------------------------------------------------
def its_stats(machine) -> dict:
    """The ITS's own counters (MachineIts.stats(): the userspace ITS's vCPU stops, hidden ITS
    kicks and commands, MSIs injected and dropped, slow-path MSIs, route compiles) and the
    model's (linux.counters: MSIs translated in Python, commands); empty for the kernel's ITS,
    whose work is all in KVM."""
    return {**machine.its.stats(), **linux.counters(machine)}


def device_stats(machine) -> dict:
    """Per PCI device, what the device model served and the interrupts it sent."""
    out = {}
    for name, entry in machine.pci_devices.items():
        dev, fn = entry.device, entry.function
        sink = fn.msix.sink
        d = {"msis_fired": sink.fired, "msis_unrouted": sink.unrouted, "msis_bad_address": sink.bad_address,
             "msix_latched": fn.msix.latched, "no_vector": fn.no_vector, "dropped_notifies": fn.dropped_notifies}
        for counter in ("reads", "writes", "flushes", "io_errors", "bad_requests"):
            if hasattr(dev, counter):
                d[counter] = getattr(dev, counter)
        out[name] = d
    return out


def delta(start: dict, end: dict) -> dict:
    """end - start of two flat or nested counter dicts (keys of end)."""
    out = {}
    for k, v in end.items():
        if isinstance(v, dict):
            out[k] = delta(start.get(k, {}), v)
        elif isinstance(v, (int, float)):
            out[k] = v - start.get(k, 0)
    return out


# -- what the progress lines say ------------------------------------------------------------------------
def buckets(progress: list[dict], width: float = BUCKET_S) -> list[dict]:
    """Throughput over time: per `width` seconds of iogen's clock, the I/O (reads, writes) and
    affinity moves between the last progress line of the bucket before and this bucket's last,
    their rate, and the phases seen."""
    out, prev = [], {"t": 0.0, "ios": 0, "reads": 0, "writes": 0, "moves": 0}
    by: dict[int, list[dict]] = {}
    for p in progress:
        by.setdefault(int(p["t"] // width), []).append(p)
    for index in sorted(by):
        last = by[index][-1]
        span = last["t"] - prev["t"]
        ios = last["ios"] - prev["ios"]
        out.append({"bucket": index, "t": last["t"], "ios": ios,
                    "reads": last.get("reads", 0) - prev.get("reads", 0),
                    "writes": last.get("writes", 0) - prev.get("writes", 0),
                    "moves": last.get("moves", 0) - prev.get("moves", 0),
                    "iops": round(ios / span, 1) if span > 0 else None,
                    "phases": sorted({p.get("phase", "?") for p in by[index]})})
        prev = last
    return out


def throughput(bucket_list: list[dict]) -> dict:
    """IOPS of the buckets wholly in the mixed phase: min, median, max, and min over median
    (how deep the worst minute fell)."""
    rates = [b["iops"] for b in bucket_list if b["phases"] == ["mixed"] and b["iops"] is not None]
    if not rates:
        return {"buckets": 0}
    median = statistics.median(rates)
    return {"buckets": len(rates), "min": min(rates), "median": median, "max": max(rates),
            "min_over_median": round(min(rates) / median, 3) if median else None}


def stall_seen(progress: list[dict]) -> dict | None:
    """The first progress line that saw an I/O outstanding past the stall bound."""
    for p in progress:
        if p.get("stalled_now", 0) > 0:
            return p
    return None


def max_gap(progress: list[dict]) -> tuple[float, float] | None:
    """(gap, t at its end) of the longest time between two progress lines (iogen's clock),
    counting from iogen's start."""
    best, t = None, 0.0
    for p in progress:
        gap = p["t"] - t
        if best is None or gap > best[0]:
            best = (round(gap, 3), p["t"])
        t = p["t"]
    return best


def failures(run: dict, config: SoakConfig) -> list[str]:
    """Why run failed, in words; empty when it passed."""
    out = []
    if run.get("stopped"):
        out.append(f"stopped by the host: {run['stopped']}")
    if run.get("guest_problem"):
        out.append(f"the guest's run: {run['guest_problem']}")
    for note in run.get("notes", []):
        out.append(f"the job: {note}")
    final = run.get("iogen")
    if final is None:
        out.append("iogen printed no final report (KVMITS-IOGEN)")
    else:
        if final.get("errors"):
            out.append(f"{final['errors']} I/O errors (the first: {final.get('first_error')})")
        v = final.get("verify") or {}
        if v.get("corrupt"):
            out.append(f"{v['corrupt']} corrupt blocks: {v.get('stale', 0)} stale, {v.get('misdirected', 0)} "
                       f"misdirected, {v.get('damaged', 0)} damaged; the first: {v.get('corrupt_blocks')}")
        if final.get("stalled"):
            out.append(f"{final['stalled']} I/Os completed only after more than {final.get('stall_seconds')} s")
        if final.get("lost"):
            out.append(f"{final['lost']} I/Os never completed (a lost interrupt or a stuck request)")
        if not final.get("ios"):
            out.append("no I/O completed")
        if v.get("phase") != "sweep":
            out.append(f"iogen ended in its {v.get('phase')!r} phase, before the read-back sweep")
        churn = final.get("churn")
        if config.churn_hz:
            if not churn:
                out.append("no affinity churn was done")
            else:
                if churn.get("move_failures"):
                    out.append(f"{churn['move_failures']} affinity moves failed (the first errno: "
                               f"{churn.get('first_errno')})")
                if not churn.get("moves"):
                    out.append("no affinity move succeeded")
    # the host's own view of lost interrupts and stuck requests
    for name, d in sorted((_get(run, "devices", "delta") or {}).items()):
        dropped = d.get("msis_unrouted", 0) + d.get("msis_bad_address", 0)
        if dropped:
            out.append(f"{name}: {dropped} MSIs fired on vectors without a route to the ITS (dropped: lost "
                       f"interrupts)")
        if d.get("bad_requests"):
            out.append(f"{name}: {d['bad_requests']} requests the device model could not complete (the device "
                       f"needs a reset)")
    dropped = (_get(run, "its_stats", "delta") or {}).get("msis_dropped", 0)
    if dropped:
        out.append(f"the hidden ITS dropped {dropped} MSIs that the userspace ITS translated (lost interrupts)")
    if run.get("iogen_rc") not in (None, 0) and not out:
        out.append(f"iogen exited with status {run['iogen_rc']}")
    seen = stall_seen(run.get("progress", []))
    if seen is not None:
        out.append(f"a stall at t={seen['t']:.0f} s: {seen['stalled_now']} I/Os outstanding for more than "
                   f"{config.stall_s:g} s (the oldest {seen.get('oldest_ms', 0) / 1000:.1f} s)")
    gap = max_gap(run.get("progress", []))
    if gap is not None and gap[0] > config.stall_s + config.progress_s:
        out.append(f"iogen printed no progress for {gap[0]:.0f} s before t={gap[1]:.0f} s (the guest stood still)")
    if run.get("bad_lines"):
        out.append(f"{len(run['bad_lines'])} malformed iogen lines, the first: {run['bad_lines'][0]!r}")
    return out


# -- a run -------------------------------------------------------------------------------------------------
class SoakSetupError(KvmitsError):
    """Nothing to soak with: no Linux guest, no iogen."""


def soak_one(its: str, guest, iogen: bytes, config: SoakConfig, workdir: str, progress=None,
             clock=time.monotonic) -> dict:
    """One boot of the soak with ITS `its`: the run's record (see failures() and format_report)."""
    from kvmits.machine import Machine, MachineConfig
    from kvmits.machine.machine import Disk

    say = progress or (lambda msg: None)
    disk = linux.disk_image(workdir, f"soak-{its}.img", config.disk_bytes)
    machine_config = MachineConfig(cpus=linux.CPUS, mem_size=linux.MEM, its=its,
                                   disks=(Disk(disk, queues=2, vectors=2),))
    tap = ConsoleTap()
    monitor = SoakMonitor(config)
    run: dict = {"its": its, "stopped": None, "vmm_error": None}
    samples: list[dict] = []
    m = Machine(machine_config, console=tap)
    try:
        m.load(guest.image, cmdline=linux.CMDLINE,
               initrd=guest.initrd(job(config), {linux.IOGEN_GUEST_PATH: iogen}))
        stats0, devices0 = its_stats(m), device_stats(m)
        t0 = clock()
        m.start()
        samples.append(dict(process_sample(), t=0.0, phase=None))
        next_sample, next_say, ended, end_sampled = t0 + SAMPLE_S, BUCKET_S, None, False
        while ended is None:
            try:
                ended = m.wait(POLL_S)
            except TimeoutError:
                pass
            except (KvmitsError, OSError) as exc:     # a vCPU thread's failure, re-raised by wait()
                run["vmm_error"] = f"{type(exc).__name__}: {exc}"
                break
            now = clock()
            for p in monitor.feed(tap.take(), now - t0):
                if p["t"] >= next_say:
                    next_say = (p["t"] // BUCKET_S + 1) * BUCKET_S
                    say(f"{its} ITS, t={p['t']:.0f} s ({p['phase']}): {p['ios']:,} I/O, {p['errors']} errors, "
                        f"{p['corrupt']} corrupt, {p['moves']:,} affinity moves")
            if monitor.final is not None and not end_sampled:
                # iogen is done and (the job waits END_WAIT_S) the machine still runs: its threads
                # and fds are there, so the sample compares with the others
                samples.append(dict(process_sample(), t=round(now - t0, 3), phase="end" if ended is None else AFTER))
                stats1, devices1, end_sampled = its_stats(m), device_stats(m), True
            if ended is None and now >= next_sample and not end_sampled:
                samples.append(dict(process_sample(), t=round(now - t0, 3), phase=monitor.phase))
                next_sample += SAMPLE_S
            if ended is None:
                why = monitor.hung(now - t0)
                if why is None and now - t0 > config.run_limit_s:
                    why = f"the run took longer than its limit of {config.run_limit_s:.0f} s"
                if why is not None and run["stopped"] is None:
                    run["stopped"] = why
                    say(f"{its} ITS: stopping the machine: {why}")
                    m.stop()
        monitor.feed(tap.take() + b"\n", clock() - t0)
        if not end_sampled:
            samples.append(dict(process_sample(), t=round(clock() - t0, 3), phase=AFTER))
            stats1, devices1 = its_stats(m), device_stats(m)
        run["wall_s"] = round(clock() - t0, 3)
    finally:
        m.close()
        try:
            os.unlink(disk)
        except OSError:
            pass                               # the temporary directory goes anyway
    text = tap.text()
    report = GuestReport.parse(text)
    problem = None
    if run["vmm_error"] is not None:
        problem = f"the VMM failed: {run['vmm_error']}"
    else:
        try:
            report.check(ended, rc=None)
        except LinuxGuestError as exc:
            problem = str(exc)
    tables = monitor.sections.tables
    run.update({
        "exit": None if ended is None else {"reason": ended.reason, "status": ended.status},
        "guest_problem": problem,
        "iogen_rc": report.rc,
        "iogen": monitor.final,
        "progress": monitor.progress,
        "buckets": buckets(monitor.progress),
        "notes": monitor.notes,
        "bad_lines": monitor.bad_lines,
        "process": dict(process_summary(samples), all=samples),
        "its_stats": {"start": stats0, "end": stats1, "delta": delta(stats0, stats1)},
        "devices": {"start": devices0, "end": devices1, "delta": delta(devices0, devices1)},
        "interrupts": linux.interrupt_delta(tables, "start", "end", IRQ) if {"start", "end"} <= set(tables) else None,
    })
    run["throughput"] = throughput(run["buckets"])
    run["failures"] = failures(run, config)
    run["ok"] = not run["failures"]
    if not run["ok"]:
        run["console_tail"] = text.splitlines()[-TAIL_LINES:]
    return run


def run_soak(its_kinds: list[str], config: SoakConfig, progress=None) -> dict:
    """The soak on each ITS in turn; the result (FORMAT, VERSION). SoakSetupError when there is
    no Linux guest or no iogen."""
    guest = LinuxGuest.find()
    if guest is None:
        raise SoakSetupError(LinuxGuest.why_missing())
    try:
        iogen = linux.iogen_path().read_bytes()
    except FileNotFoundError as exc:
        raise SoakSetupError(str(exc)) from None
    say = progress or (lambda msg: None)
    runs = []
    with tempfile.TemporaryDirectory(prefix="kvmits-soak-") as workdir:
        for its in its_kinds:
            say(f"{its} ITS: booting the Linux guest for {config.minutes:g} min of verified I/O "
                f"at QD{config.qd}, {config.churn_hz:g} affinity moves/s")
            run = soak_one(its, guest, iogen, config, workdir, say)
            say(f"{its} ITS: {'PASS' if run['ok'] else 'FAIL'}" +
                ("" if run["ok"] else ": " + "; ".join(run["failures"])))
            runs.append(run)
    return {"format": FORMAT, "version": VERSION, "config": asdict(config), "host_kernel": os.uname().release,
            "guest_kernel": guest.kernel_release, "cpus": linux.CPUS, "mem": linux.MEM,
            "ok": all(r["ok"] for r in runs), "runs": runs}


# -- the report -------------------------------------------------------------------------------------------
def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _n(value, digits: int = 0) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{value:,.{digits}f}"


def _mib(kb) -> str:
    return _n(kb / 1024, 1) if isinstance(kb, (int, float)) else "-"


def _verdict(run):
    return "PASS" if run.get("ok") else "FAIL"


def _ios(run):
    v = _get(run, "iogen", "verify")
    return f"{_n(_get(run, 'iogen', 'ios'))} ({_n(_get(v, 'reads'))} / {_n(_get(v, 'writes'))})"


def _checked(run):
    v = _get(run, "iogen", "verify") or {}
    return f"{_n(v.get('blocks'))} blocks: {_n(v.get('fill_writes'))} / {_n(v.get('sweep_reads'))}"


def _corrupt(run):
    v = _get(run, "iogen", "verify") or {}
    return f"{_n(v.get('corrupt'))} ({_n(v.get('stale'))} / {_n(v.get('misdirected'))} / {_n(v.get('damaged'))})"


def _stalls(run):
    return f"{_n(_get(run, 'iogen', 'stalled'))} / {_n(_get(run, 'iogen', 'lost'))}"


def _latency(run):
    lat = _get(run, "iogen", "lat_us") or {}
    ms = {k: lat[k] / 1000 if isinstance(lat.get(k), (int, float)) else None for k in ("p50", "p99", "max")}
    return f"{_n(ms['p50'], 1)} / {_n(ms['p99'], 1)} / {_n(ms['max'], 1)}"


def _oldest(run):
    seen = [p.get("oldest_ms") for p in run.get("progress", [])]
    return _n(max(seen), 1) if seen else "-"


def _moves(run):
    churn = _get(run, "iogen", "churn")
    if not churn:
        return "no churn"
    secs = _get(run, "iogen", "seconds")
    rate = churn["moves"] / secs if isinstance(secs, (int, float)) and secs > 0 else None
    return f"{_n(churn.get('moves'))} ({_n(churn.get('move_failures'))}), {_n(rate, 1)}/s"


def _iops(run):
    t = run.get("throughput") or {}
    return f"{_n(t.get('min'))} / {_n(t.get('median'))} / {_n(t.get('max'))}"


def _worst(run):
    return _n(_get(run, "throughput", "min_over_median"), 2)


def _rss(run):
    p = run.get("process") or {}
    return f"{_mib(_get(p, 'start', 'rss_kb'))} -> {_mib(_get(p, 'end', 'rss_kb'))}"


def _anon(run):
    p = run.get("process") or {}
    growth = _get(p, "growth", "anon_kb")
    flat = _get(p, "flat", "anon")
    return (f"{_mib(_get(p, 'steady', 'anon_kb'))} -> {_mib(_get(p, 'end', 'anon_kb'))} "
            f"({'+' if isinstance(growth, (int, float)) and growth >= 0 else ''}{_n(growth)} KiB, "
            f"{'flat' if flat else 'GREW'})")


def _handles(key):
    def row(run):
        p = run.get("process") or {}
        flat = _get(p, "flat", key)
        return (f"{_n(_get(p, 'start', key))} / {_n(_get(p, 'steady', key))} / {_n(_get(p, 'end', key))} "
                f"({'flat' if flat else 'GREW'})")
    return row


def _shmem(run):
    return _mib(_get(run, "process", "end", "shmem_kb"))


def _its(run):
    d = _get(run, "its_stats", "delta") or {}
    if not d:
        return "in KVM"
    return (f"{_n(d.get('vcpu_stops'))} / {_n(d.get('commands'))} / {_n(d.get('python_msis'))} / "
            f"{_n(d.get('slow_path_msis'))}")


def _device(run):
    d = _get(run, "devices", "delta") or {}
    disk = next(iter(d.values()), {})
    return (f"{_n(disk.get('reads'))} / {_n(disk.get('writes'))}; {_n(disk.get('msis_fired'))} MSIs "
            f"({_n(disk.get('msis_unrouted'))} unrouted)")


def _irqs(run):
    per = run.get("interrupts")
    if not per:
        return "-"
    return f"{sum(per):,}: " + ", ".join(f"{n:,}" for n in per)


#: the summary's rows: (label, the cell of a run)
ROWS = (
    ("verdict", _verdict),
    ("I/O done (reads / writes)", _ios),
    ("every block written / read back (fill / sweep)", _checked),
    ("I/O errors", lambda r: _n(_get(r, "iogen", "errors"))),
    ("corrupt blocks (stale / misdirected / damaged)", _corrupt),
    ("stalled I/O (> stall bound) / lost I/O", _stalls),
    ("I/O latency p50 / p99 / max (ms)", _latency),
    ("oldest I/O in flight at a progress line (ms)", _oldest),
    ("affinity moves done (failed), rate", _moves),
    ("IOPS per minute, mixed phase: min / median / max", _iops),
    ("worst minute / median minute", _worst),
    ("VMM RSS start -> end (MiB)", _rss),
    ("VMM private memory (RssAnon), steady -> end (MiB)", _anon),
    ("VMM open fds start / steady / end", _handles("fds")),
    ("VMM threads start / steady / end", _handles("threads")),
    ("guest RAM resident at the end (RssShmem, MiB)", _shmem),
    ("ITS: vCPU stops / commands / Python MSIs / slow path", _its),
    ("disk model: reads / writes served; MSIs sent", _device),
    ("guest interrupts of the disk's vector, per vCPU", _irqs),
)

ITS_LABELS = {"kernel": "kernel ITS", "user": "userspace ITS"}


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return out
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header, *rows]]


def format_report(result: dict, markdown: bool = False, emulated: bool | None = None) -> str:
    """The soak's result as a summary table, the IOPS of each minute, and each run's failures:
    aligned text, or markdown (docs/soak.md's tables)."""
    runs = result.get("runs", [])
    config = result.get("config", {})
    head = [""] + [ITS_LABELS.get(r.get("its"), str(r.get("its"))) for r in runs]
    lines = []
    title = (f"kvmits soak: {_n(config.get('minutes'), 1)} min per ITS at QD{config.get('qd')}, "
             f"{config.get('churn_hz')} affinity moves/s, stall bound {config.get('stall_s')} s; guest "
             f"{result.get('guest_kernel')}, {result.get('cpus')} vCPUs")
    lines += [f"**{title}**" if markdown else title, ""]
    lines += _table(head, [[label] + [cell(r) for r in runs] for label, cell in ROWS], markdown)
    minutes = sorted({b["bucket"] for r in runs for b in r.get("buckets", [])})
    if minutes:
        lines.append("")
        by = [{b["bucket"]: b for b in r.get("buckets", [])} for r in runs]
        mhead = ["minute"] + [f"{h} IOPS (moves)" for h in head[1:]]
        rows = []
        for minute in minutes:
            cells = [str(minute + 1)]
            for b in by:
                x = b.get(minute)
                cells.append("-" if x is None else
                             f"{_n(x['iops'])} ({_n(x['moves'])})" + ("" if x["phases"] == ["mixed"]
                                                                     else " " + "+".join(x["phases"])))
            rows.append(cells)
        lines += _table(mhead, rows, markdown)
    for r in runs:
        if r.get("failures"):
            lines += ["", f"{ITS_LABELS.get(r.get('its'), r.get('its'))}: FAIL"]
            lines += [f"- {why}" for why in r["failures"]]
    if emulated:
        lines += ["", "Times are EMULATED (arm64 KVM nested in qemu TCG, the testbed)."]
    return "\n".join(lines)
