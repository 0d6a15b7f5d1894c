"""Part 5 of `kvmits bench`: a Linux guest's boot and virtio-blk I/O with each ITS (issue 14).

The guest is the nested Linux guest (kvmits.lab.linux_guest: Debian's arm64 kernel, busybox, the
virtio modules) on CPUS vCPUs with two virtio-blk disks:
- vda: one queue per vCPU, one MSI-X vector per queue (Linux spreads them over the CPUs and
  manages their affinity: what a guest's disk normally is);
- vdb: two queues sharing one vector (Disk.vectors = 2), whose affinity Linux leaves to the
  administrator, so the churn phase can move it through /proc/irq/N/smp_affinity_list: Linux's
  ITS driver sends a MOVI for each move.
The job runs iogen (guests/linux/iogen.c, built by `make -C guests`: a static arm64 program,
4 KiB random O_DIRECT reads with Linux AIO at a queue depth) in four phases, each announced by
a console line "KVMITS-PHASE <name>": io-qd1 and io-qd16 on vda, shared-qd16 on vdb, and
churn (vdb at QD16 while the vector moves CHURN_HZ times a second).

Each ITS boots `repeat` timed runs and one traced run:
- timed: the console's KVMITS- lines are timed from just before KVM_RUN (machine.start()):
  boot to userspace is /init's first line (KVMITS-GUEST-INIT), to the devices probed the line
  after the virtio modules' insmod (KVMITS-GUEST-READY); iogen's report gives IOPS and latency;
  /proc/interrupts after each phase gives the interrupts per vCPU; the userspace ITS's counters
  (vCPU stops, the model's MSIs: every MSI the model translates is Python work) are read at each
  phase's start and end. Nothing is traced (tracing costs Python time on the ITS path).
- traced: the same job with `kvmits run --trace all` (kvmits.machine.trace), summarized by
  phase: GITS accesses by register, commands by type, vCPU stops and their time, Python
  translations, device interrupts; per I/O from iogen's counts.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

from kvmits.bench import figure

CPUS = 4
MEM = 512 << 20
DISK_BYTES = 64 << 20
CHURN_HZ = 20
CMDLINE = "console=ttyAMA0 quiet panic=-1"
BOOT_TIMEOUT = 600.0
#: iogen as the guest runs it
IOGEN_GUEST_PATH = "bin/iogen"
IOGEN_MARK = "KVMITS-IOGEN "
PHASES = ("io-qd1", "io-qd16", "shared-qd16", "churn")
#: the disks: vda the guest's usual disk, vdb two queues on one shared (movable) vector
VDA_IRQ = re.compile(r"virtio0-req\.\d+$")
VDB_IRQ = re.compile(r"virtio1-virtqueues$")


class Sizes:
    def __init__(self, quick: bool, repeat: int):
        self.repeat = 1 if quick else repeat
        self.seconds = 2 if quick else 5           # per I/O phase


def iogen_path() -> Path:
    """guests/build/iogen (or $KVMITS_GUEST_DIR/iogen); FileNotFoundError saying how to build it."""
    env = os.environ.get("KVMITS_GUEST_DIR")
    directory = Path(env) if env else Path(__file__).resolve().parents[2] / "guests" / "build"
    path = directory / "iogen"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the guest programs with `make -C guests`")
    return path


#: the jobs' shell function `irqs NAME`: /proc/interrupts as a section InterruptTables reads
IRQS_SH = 'irqs() { echo "== interrupts $1"; cat /proc/interrupts; echo "== end"; }'


def job(seconds: float, churn_hz: int = CHURN_HZ, cpus: int = CPUS) -> str:
    """The guest's job: the four phases, /proc/interrupts after each."""
    run = f"/{IOGEN_GUEST_PATH} --seconds {seconds}"
    return f"""
{IRQS_SH}
irqs start
echo "KVMITS-PHASE io-qd1"
{run} /dev/vda --qd 1 --seed 1
irqs io-qd1
echo "KVMITS-PHASE io-qd16"
{run} /dev/vda --qd 16 --seed 2
irqs io-qd16
echo "KVMITS-PHASE shared-qd16"
{run} /dev/vdb --qd 16 --seed 3
irqs shared-qd16
irq=$(grep -m1 'virtio1-virtqueues' /proc/interrupts | cut -d: -f1 | tr -d ' ')
echo "KVMITS-PHASE churn"
{run} /dev/vdb --qd 16 --seed 4 --churn "$irq" --churn-hz {churn_hz} --cpus {cpus}
irqs churn
echo "KVMITS-PHASE end"
"""


def parse_interrupts(text: str, cpus: int = CPUS) -> dict[str, list[int]]:
    """/proc/interrupts: action name -> count per CPU (the numbered lines only)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < cpus + 2 or not parts[0].endswith(":") or not parts[0][:-1].isdigit():
            continue
        try:
            counts = [int(p) for p in parts[1:1 + cpus]]
        except ValueError:
            continue
        out[parts[-1]] = counts
    return out


class InterruptTables:
    """The /proc/interrupts sections a job prints with IRQS_SH, read line by line: `tables`,
    section name -> parse_interrupts() of it."""

    def __init__(self, cpus: int = CPUS):
        self.cpus = cpus
        self.tables: dict[str, dict[str, list[int]]] = {}
        self._section: str | None = None
        self._lines: list[str] = []

    def line(self, line: str) -> bool:
        """Take one console line (without its line end); True if it belonged to a section."""
        if line.startswith("== interrupts "):
            parts = line.split()
            self._section, self._lines = (parts[2] if len(parts) > 2 else ""), []
            return True
        if self._section is None:
            return False
        if line == "== end":
            self.tables[self._section] = parse_interrupts("\n".join(self._lines), self.cpus)
            self._section = None
        else:
            self._lines.append(line)
        return True


def parse_output(console: str) -> tuple[dict[str, dict], dict[str, dict[str, list[int]]]]:
    """(phase -> iogen's report, phase -> /proc/interrupts) from the job's console output."""
    reports = {}
    phase, sections = None, InterruptTables()
    for line in console.replace("\r", "").splitlines():
        if sections.line(line):
            continue
        if line.startswith("KVMITS-PHASE "):
            phase = line.split(None, 1)[1].strip()
        elif line.startswith(IOGEN_MARK) and phase is not None:
            reports[phase] = json.loads(line[len(IOGEN_MARK):])
    return reports, sections.tables


def interrupt_delta(tables: dict, before: str, after: str, name: re.Pattern) -> list[int]:
    """Per-CPU interrupts of the actions matching `name` between two /proc/interrupts tables."""
    out = [0] * CPUS
    for action, counts in tables.get(after, {}).items():
        if name.search(action):
            old = tables.get(before, {}).get(action, [0] * CPUS)
            out = [o + c - p for o, c, p in zip(out, counts, old)]
    return out


class _Marks:
    """The console's KVMITS- lines, timed and with the ITS's counters at that moment (the
    `tracer` kvmits.machine.trace.ConsoleMarks writes marks to)."""

    def __init__(self):
        self.t0 = None
        self.machine = None
        self.marks: list[tuple[float, str, dict]] = []

    def wants(self, cls: str) -> bool:
        return cls == "mark"

    def emit(self, cls: str, text: str) -> None:
        self.marks.append((time.monotonic() - self.t0, text, counters(self.machine)))

    def at(self, prefix: str):
        for mark in self.marks:
            if mark[1].startswith(prefix):
                return mark
        return None


def counters(machine) -> dict:
    """The ITS path's work counters: the userspace ITS's vCPU stops and its model's MSIs (each
    one translated in Python), commands; nothing for the kernel's ITS (all in KVM)."""
    its = machine.its
    model = getattr(its, "model", None)
    if model is None:
        return {}
    stats = its.stats()
    return {"vcpu_stops": stats["vcpu_stops"], "python_msis": model.msis, "commands": model.commands_processed,
            "slow_path_msis": stats.get("slow_path_msis", 0)}


def disk_image(workdir: str, name: str, size: int) -> str:
    """A new disk image file of `size` bytes of zeros (sparse) in workdir; its path."""
    path = os.path.join(workdir, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def boot(its: str, guest, iogen: bytes, seconds: float, *, traced: bool, workdir: str) -> dict:
    """One boot of the job with ITS `its`: the console's marks and output, and (traced) the
    trace's summary."""
    from kvmits.lab.linux_guest import GuestReport
    from kvmits.machine import Machine, MachineConfig
    from kvmits.machine.machine import Disk
    from kvmits.machine.trace import CLASSES, ConsoleMarks, Tracer, read_trace, summarize

    disks = [disk_image(workdir, name, DISK_BYTES) for name in ("vda.img", "vdb.img")]
    config = MachineConfig(cpus=CPUS, mem_size=MEM, its=its,
                           disks=(Disk(disks[0]), Disk(disks[1], queues=2, vectors=2)))
    out = io.BytesIO()
    marks = _Marks()
    trace_out = io.StringIO()
    tracer = Tracer(trace_out, CLASSES) if traced else None
    console = ConsoleMarks(out, tracer if traced else marks)
    m = Machine(config, console=console)
    try:
        m.load(guest.image, cmdline=CMDLINE, initrd=guest.initrd(job(seconds), {IOGEN_GUEST_PATH: iogen}))
        marks.machine = m
        if tracer is not None:
            tracer.attach(m)
        marks.t0 = time.monotonic()
        result = m.run(BOOT_TIMEOUT)
        GuestReport.parse(out.getvalue()).check(result)
    finally:
        if tracer is not None:
            tracer.close()
        m.close()
    text = out.getvalue().decode("utf-8", "replace")
    reports, tables = parse_output(text)
    missing = [p for p in PHASES if p not in reports]
    if missing:
        raise RuntimeError(f"the guest's job reported no iogen result for {missing}; its console ends:\n"
                           + "\n".join(text.splitlines()[-15:]))
    run = {"its": its, "reports": reports, "tables": tables, "marks": marks.marks}
    if traced:
        run["trace"] = summarize(*read_trace(trace_out.getvalue().splitlines()))
    return run


def _phase_counters(run: dict, phase: str) -> dict:
    """The counters' change over a phase (timed runs; empty for the kernel's ITS)."""
    names = [m[1] for m in run["marks"]]
    start = names.index(f"KVMITS-PHASE {phase}")
    following = [i for i in range(start + 1, len(names)) if names[i].startswith("KVMITS-PHASE ")]
    begin, end = run["marks"][start][2], run["marks"][following[0] if following else -1][2]
    return {k: end[k] - begin[k] for k in begin}


def _figures(its: str, timed: list[dict], traced: dict) -> list[dict]:
    out = []
    userspace = [r["marks_at"]["KVMITS-GUEST-INIT"] for r in timed]
    devices = [r["marks_at"]["KVMITS-GUEST-READY"] for r in timed]
    out.append(figure(5, "linux_boot", its, "userspace", "s", "lower", userspace))
    out.append(figure(5, "linux_boot", its, "devices_probed", "s", "lower", devices))
    for phase, path in (("io-qd1", "qd1"), ("io-qd16", "qd16"), ("shared-qd16", "shared_qd16"),
                        ("churn", "shared_qd16_churn")):
        reps = [r["reports"][phase] for r in timed]
        out.append(figure(5, "blk_iops", its, path, "IOPS", "higher", [x["iops"] for x in reps],
                          errors=sum(x["errors"] for x in reps), lost=sum(x["lost"] for x in reps)))
        out.append(figure(5, "blk_latency", its, path + "_p50", "us", "lower", [x["lat_us"]["p50"] for x in reps]))
        out.append(figure(5, "blk_latency", its, path + "_p99", "us", "lower", [x["lat_us"]["p99"] for x in reps]))
    # interrupts per second and the vCPUs that took them, at QD16 on vda
    rates, per_cpu = [], [0] * CPUS
    for r in timed:
        delta = interrupt_delta(r["tables"], "io-qd1", "io-qd16", VDA_IRQ)
        rates.append(sum(delta) / r["reports"]["io-qd16"]["seconds"])
        per_cpu = [a + b for a, b in zip(per_cpu, delta)]
    out.append(figure(5, "irq_rate", its, "qd16", "interrupts/s", "higher", rates, per_vcpu=per_cpu))
    churn = [r["reports"]["churn"]["churn"] for r in timed]
    seconds = [r["reports"]["churn"]["seconds"] for r in timed]
    out.append(figure(5, "affinity_moves", its, "churn", "moves/s", "higher",
                      [c["moves"] / s for c, s in zip(churn, seconds)],
                      target_hz=CHURN_HZ, move_failures=sum(c["move_failures"] for c in churn),
                      lost=sum(r["reports"]["churn"]["lost"] + r["reports"]["churn"]["errors"] for r in timed)))
    # the ITS path's Python work per I/O in the I/O phases (the model's MSIs: each is a
    # translation in Python), from the timed runs' counters; 0 by construction for the kernel's
    python = []
    for r in timed:
        ios = sum(r["reports"][p]["ios"] for p in PHASES)
        work = sum(_phase_counters(r, p).get("python_msis", 0) for p in PHASES)
        python.append(work / ios if ios else 0.0)
    out.append(figure(5, "python_its_work", its, "per_io", "translations/IO", "lower", python, seen=its == "user"))
    out += _traffic(its, traced)
    return out


def _traffic(its: str, traced: dict) -> list[dict]:
    """The traced run's ITS traffic at boot (KVM_RUN to KVMITS-GUEST-READY) and over the I/O
    phases, per I/O for the latter; one sample each (n = 1)."""
    phases = {p["name"]: p for p in traced["trace"]["phases"]}
    ios = sum(traced["reports"][p]["ios"] for p in PHASES)
    out = []
    for where, names in (("boot", ("boot",)), ("io", PHASES)):
        ps = [phases[n] for n in names if n in phases]

        def merged(key):
            total: dict = {}
            for p in ps:
                for k, v in p[key].items():
                    total[k] = total.get(k, 0) + v
            return total

        mmio, commands, translations = merged("mmio"), merged("commands"), merged("translations")
        irqs = merged("irqs")
        stops = sum(p["stops"]["count"] for p in ps)
        held = sum(p["stops"]["held"] for p in ps)
        wait = sum(p["stops"]["wait"] for p in ps)
        scale = (lambda n: n / ios) if where == "io" and ios else (lambda n: n)
        unit = "per I/O" if where == "io" else "count"
        out.append(figure(5, "its_accesses", its, where, unit, "lower", [scale(sum(mmio.values()))],
                          by_register=mmio, seen=its == "user"))
        out.append(figure(5, "its_commands", its, where, unit, "lower", [scale(sum(commands.values()))],
                          by_type=commands, seen=its == "user"))
        out.append(figure(5, "vcpu_stops", its, where, unit, "lower", [scale(stops)], held_s=round(held, 6), wait_s=round(wait, 6),
                          seen=its == "user"))
        out.append(figure(5, "python_translations", its, where, unit, "lower",
                          [scale(sum(translations.values()))], by_path=translations, seen=its == "user"))
        out.append(figure(5, "device_interrupts", its, where, unit, "higher", [scale(sum(irqs.values()))],
                          by_device=irqs))
    return out


def run_linux(sizes: Sizes, progress) -> tuple[list[dict], list[dict]]:
    """Part 5 for both ITSes (each ITS's runs alternate with the other's, so that a slow spell of
    the host falls on both); (figures, skipped)."""
    from kvmits.bench import ITS_MODES
    from kvmits.lab.linux_guest import LinuxGuest

    guest = LinuxGuest.find()
    if guest is None:
        return [], [{"part": 5, "reason": LinuxGuest.why_missing()}]
    try:
        iogen = iogen_path().read_bytes()
    except FileNotFoundError as exc:
        return [], [{"part": 5, "reason": str(exc)}]
    timed: dict[str, list] = {its: [] for its in ITS_MODES}
    traced: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kvmits-bench-linux-") as workdir:
        for i in range(sizes.repeat + 1):
            for its in ITS_MODES:
                kind = "traced" if i == sizes.repeat else f"timed {i + 1}/{sizes.repeat}"
                progress(f"part 5: Linux guest, {its} ITS, {kind} run")
                run = boot(its, guest, iogen, sizes.seconds, traced=i == sizes.repeat, workdir=workdir)
                if i == sizes.repeat:
                    traced[its] = run
                else:
                    run["marks_at"] = {text.split()[0]: t for t, text, _ in run["marks"]}
                    timed[its].append(run)
    figures = []
    for its in ITS_MODES:
        figures += _figures(its, timed[its], traced[its])
    return figures, []
