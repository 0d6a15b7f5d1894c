"""kvmits' trace: what the VMM sees of a guest's ITS traffic, as JSON lines (`kvmits run --trace`).

One event per line, each with `t` (seconds since the trace started, CLOCK_MONOTONIC), `class`
and `vcpu` (the index of the vCPU thread it happened on, null on a device or host thread). The
first line is a header: {"class": "trace", "format": "kvmits-trace", "version": 1, "its": kind,
"classes": [...], "start": <time.monotonic() at t = 0>, "note": ...}.

The classes (a SPEC selects them, like QEMU's `-trace gicv3_its_*`: see parse_spec):

| class         | ITS    | what                                                                  |
|---------------|--------|-----------------------------------------------------------------------|
| its_mmio      | user   | a guest access to the GITS_* frame: off, reg, size, rw, value          |
| its_cmd       | user   | a command the model processed: offset, cmd, fields, error, error_name |
| its_translate | user   | a translation done in Python (GITS_TRANSLATER, signal_msi, the irqfd  |
|               |        | slow path): devid, eventid, intid, icid, target, result, path         |
| its_stop      | user   | a command batch's vCPU stop: wait (s until every vCPU was out of      |
|               |        | KVM_RUN), held (s they stood still), commands, vcpus (how many)       |
| its_routes    | user   | an irqfd route recompilation: routes (in KVM), slow (left to Python), |
|               |        | seconds                                                               |
| msi_routes    | both   | the machine's MSI routing table set: entries, table ([devid, eventid, |
|               |        | gsi], at most ROUTES_SHOWN)                                           |
| msi_signal    | kernel | a KVM_SIGNAL_MSI kvmits sent to the guest's ITS: devid, eventid,      |
|               |        | delivered                                                             |
| irq           | both   | a PCI function's MSI-X vector fired (an irqfd write): device, vector, |
|               |        | devid, eventid, sent (false: unrouted or a bad address, dropped)      |
| mark          | both   | a console line starting with "KVMITS-" (phase markers): text          |

With the kernel's ITS the ITS itself is the kernel's: its register accesses, commands and
translations happen in KVM and are not seen (the header's note says so); what kvmits does around
it (routes, KVM_SIGNAL_MSI, device interrupts) is.

Off by default, and free when off: nothing here is called unless a Tracer is attached. The
hooks are the model's observer lists and short observer lists checked by the command path, the
route compiler, the MSI router and KernelMachineIts.signal_msi (empty lists: one truth test each,
none on the exit loop); the GITS frame is wrapped on the MMIO bus only while tracing.

Phases (summarize): events before the first mark are "boot"; KVMITS-GUEST-READY starts "job",
KVMITS-GUEST-DONE "shutdown", and a line "KVMITS-PHASE <name>" starts <name>.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import threading
import time
from typing import IO, Iterable

from kvmits.its.commands import decode_command
from kvmits.its.registers import register_name

TRACE_FORMAT = "kvmits-trace"
TRACE_VERSION = 1
#: entries of a routing table an msi_routes event lists (the count is always whole)
ROUTES_SHOWN = 256
#: console markers the trace keeps: lines starting with this
MARK_PREFIX = "KVMITS-"
PHASE_MARK = "KVMITS-PHASE "
#: marks that start a phase of their own name (kvmits.lab.linux_guest's /init markers)
PHASE_OF_MARK = {"KVMITS-GUEST-READY": "job", "KVMITS-GUEST-DONE": "shutdown"}
FIRST_PHASE = "boot"

CLASSES: dict[str, str] = {
    "its_mmio": "guest accesses to the userspace ITS's GITS_* frame",
    "its_cmd": "commands the userspace ITS processed, decoded, with their error code",
    "its_translate": "translations done in Python by the userspace ITS (DeviceID, EventID -> LPI, vCPU, or why not)",
    "its_stop": "vCPU stops of the userspace ITS's command batches, and how long the vCPUs stood still",
    "its_routes": "recompilations of the userspace ITS's irqfd routes",
    "msi_routes": "the machine's MSI routing table, each time it is set",
    "msi_signal": "KVM_SIGNAL_MSI calls to the kernel's ITS",
    "irq": "MSI-X vectors fired by PCI devices (irqfd writes)",
    "mark": "console lines starting with KVMITS- (phase markers)",
}
#: the classes only the userspace ITS has (the kernel's ITS does these in KVM, unseen)
USER_ITS_CLASSES = frozenset(("its_mmio", "its_cmd", "its_translate", "its_stop", "its_routes"))
KERNEL_ITS_NOTE = ("the kernel's ITS: its register accesses, commands and translations happen in KVM and are not "
                   "traced; only what kvmits does around it (MSI routes, KVM_SIGNAL_MSI, device interrupts)")
USER_ITS_NOTE = "kvmits' userspace ITS: every guest access, command and Python translation is traced"


def parse_spec(spec: str) -> frozenset[str]:
    """The classes a SPEC selects: comma-separated class names or globs (`its_*`, `all`), a
    leading '-' removes what it matches (`all,-its_mmio`). ValueError for a term that matches
    no class, naming the classes there are."""
    chosen: set[str] = set()
    for term in (t.strip() for t in spec.split(",")):
        if not term:
            continue
        drop = term.startswith("-")
        pattern = term[1:] if drop else term
        if pattern in ("all", "*"):
            pattern = "*"
        hits = fnmatch.filter(CLASSES, pattern)
        if not hits:
            raise ValueError(f"trace class {pattern!r} matches none of {', '.join(CLASSES)} (or all)")
        if drop:
            chosen.difference_update(hits)
        else:
            chosen.update(hits)
    if not chosen:
        raise ValueError(f"the trace SPEC {spec!r} selects no class")
    return frozenset(chosen)


_local = threading.local()


def _vcpu() -> int | None:
    """The vCPU index of this thread (the runner names them vcpu<N>), cached per thread."""
    try:
        return _local.vcpu
    except AttributeError:
        name = threading.current_thread().name
        _local.vcpu = int(name[4:]) if name.startswith("vcpu") and name[4:].isdigit() else None
        return _local.vcpu


class Tracer:
    """Writes events of `classes` to `out` (a text file, line-buffered or not: every event is
    one write of one line). attach(machine) hooks it into a machine; a machine a migration
    makes can be attached too (the trace goes on in the same file)."""

    def __init__(self, out: IO[str], classes: Iterable[str], *, clock=time.monotonic):
        self.out = out
        self.classes = frozenset(classes)
        unknown = self.classes - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown trace classes {sorted(unknown)}")
        self.clock = clock
        self.start = clock()
        self._lock = threading.Lock()
        self._header_written = False
        self.events = 0
        self._detach: list = []

    def wants(self, cls: str) -> bool:
        return cls in self.classes

    def emit(self, cls: str, **fields) -> None:
        event = {"t": round(self.clock() - self.start, 6), "class": cls, "vcpu": _vcpu()}
        event.update(fields)
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with self._lock:
            self.out.write(line)
            self.events += 1

    def _header(self, its_kind: str | None) -> None:
        with self._lock:
            if self._header_written:
                return
            self._header_written = True
            note = KERNEL_ITS_NOTE if its_kind == "kernel" else USER_ITS_NOTE if its_kind == "user" else "no ITS"
            self.out.write(json.dumps({"class": "trace", "format": TRACE_FORMAT, "version": TRACE_VERSION,
                                       "its": its_kind, "classes": sorted(self.classes), "start": self.start,
                                       "note": note}, separators=(",", ":")) + "\n")

    # -- hooks ------------------------------------------------------------------------------------
    def attach(self, machine) -> None:
        """Hook into `machine` (before or after start()): its ITS, its MSI router, its bus."""
        its = machine.its
        self._header(None if its is None else its.kind)
        if its is not None and its.kind == "user":
            self._attach_user_its(machine, its)
        if its is not None and its.kind == "kernel" and self.wants("msi_signal"):
            self._add(its.signal_observers, self._on_signal)
        router = machine.msi
        if router is not None:
            if self.wants("msi_routes"):
                self._add(router.route_observers, self._on_routes)
            if self.wants("irq"):
                self._add(router.fire_observers, self._on_fire)

    def _attach_user_its(self, machine, its) -> None:
        model = its.model
        if self.wants("its_mmio"):
            frame = its.frame_device
            traced = TracedFrame(frame, self)
            machine.bus.replace(frame, traced)
            self._detach.append(lambda: machine.bus.replace(traced, frame))
        if self.wants("its_cmd"):
            self._add(model.command_observers, self._on_command)
        if self.wants("its_translate"):
            self._add(model.translation_observers, self._on_translation)
        if self.wants("its_stop"):
            self._add(its.stop_observers, self._on_stop)
        if self.wants("its_routes") and its.routes is not None:
            self._add(its.routes.compile_observers, self._on_compile)

    def _add(self, observers: list, fn) -> None:
        observers.append(fn)
        self._detach.append(lambda: observers.remove(fn))

    def detach(self) -> None:
        """Unhook from every machine attached so far."""
        while self._detach:
            self._detach.pop()()

    def console(self, out) -> ConsoleMarks:
        """A console stream (for Machine(console=...)) that writes to `out` and traces marks."""
        return ConsoleMarks(out, self)

    def close(self) -> None:
        self.detach()
        with self._lock:
            self.out.flush()

    # -- what each hook records ---------------------------------------------------------------------
    def _on_command(self, record) -> None:
        fields = decode_command(*record.dwords)
        name = fields.pop("command")
        self.emit("its_cmd", offset=record.offset, cmd=name, fields=fields, error=record.error,
                  error_name=record.error_name or None, stalled=record.stalled)

    def _on_translation(self, devid: int, eventid: int, result) -> None:
        name = threading.current_thread().name
        path = ("irqfd_slow_path" if name == "kvmits-msi-slow-path" else
                "translater" if _vcpu() is not None else "signal_msi")
        ok = result.ok
        self.emit("its_translate", devid=devid, eventid=eventid, intid=result.intid if ok else None,
                  icid=result.icid if ok else None, target=result.target if ok else None,
                  result=result.reason_name, path=path)

    def _on_stop(self, wait: float, held: float, commands: int, vcpus: int) -> None:
        self.emit("its_stop", wait=round(wait, 6), held=round(held, 6), commands=commands, vcpus=vcpus)

    def _on_compile(self, routes: int, slow: int, seconds: float) -> None:
        self.emit("its_routes", routes=routes, slow=slow, seconds=round(seconds, 6))

    def _on_routes(self, table: dict) -> None:
        shown = [[d, e, g] for (d, e), g in sorted(table.items())[:ROUTES_SHOWN]]
        self.emit("msi_routes", entries=len(table), table=shown)

    def _on_signal(self, devid: int, eventid: int, delivered: int) -> None:
        self.emit("msi_signal", devid=devid, eventid=eventid, delivered=delivered)

    def _on_fire(self, device: str, vector: int, key, sent: bool) -> None:
        devid, eventid = key if key is not None else (None, None)
        self.emit("irq", device=device, vector=vector, devid=devid, eventid=eventid, sent=sent)


class TracedFrame:
    """The userspace ITS's frame device with every access traced (on the bus only while tracing)."""

    def __init__(self, frame, tracer: Tracer):
        self.frame = frame
        self.tracer = tracer

    def mmio_read(self, vcpu: int, offset: int, size: int) -> int:
        value = self.frame.mmio_read(vcpu, offset, size)
        self.tracer.emit("its_mmio", off=offset, reg=register_name(offset), size=size, rw="r", value=value)
        return value

    def mmio_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        # traced before the write: the commands it runs come after it in the trace
        self.tracer.emit("its_mmio", off=offset, reg=register_name(offset), size=size, rw="w", value=value)
        self.frame.mmio_write(vcpu, offset, size, value)


class ConsoleMarks:
    """A console stream that passes everything to `out` and traces each line starting with
    KVMITS- as a mark (at most 4096 characters of a line are kept)."""

    def __init__(self, out, tracer: Tracer):
        self.out = out
        self.tracer = tracer
        self._line = bytearray()

    def write(self, data: bytes) -> int:
        self.out.write(data)
        if self.tracer.wants("mark"):
            for byte in data:
                if byte == 0x0A:
                    line = self._line.decode(errors="replace").strip("\r")
                    self._line.clear()
                    if line.startswith(MARK_PREFIX):
                        self.tracer.emit("mark", text=line)
                elif len(self._line) < 4096:
                    self._line.append(byte)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


# -- reading a trace ---------------------------------------------------------------------------------
class TraceFormatError(ValueError):
    """A file that is not a kvmits trace, or a line that is not an event."""


def read_trace(lines: Iterable[str]) -> tuple[dict, list[dict]]:
    """(header, events) of a trace's lines; TraceFormatError naming the first bad line."""
    header, events = None, []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError as exc:
            raise TraceFormatError(f"line {n}: not JSON ({exc})") from None
        if not isinstance(ev, dict) or "class" not in ev:
            raise TraceFormatError(f"line {n}: not a trace event (no 'class')")
        if ev["class"] == "trace":
            if header is None:
                if ev.get("format") != TRACE_FORMAT or ev.get("version") != TRACE_VERSION:
                    raise TraceFormatError(f"line {n}: a {ev.get('format')!r} v{ev.get('version')!r} header, "
                                           f"this kvmits reads {TRACE_FORMAT!r} v{TRACE_VERSION}")
                header = ev
            continue
        if header is None:
            raise TraceFormatError(f"line {n}: an event before the trace header")
        if ev["class"] not in CLASSES or not isinstance(ev.get("t"), (int, float)):
            raise TraceFormatError(f"line {n}: class {ev['class']!r} or time {ev.get('t')!r} is not a trace event's")
        events.append(ev)
    if header is None:
        raise TraceFormatError("no trace header: not a kvmits trace")
    return header, events


def phase_of(mark: str) -> str | None:
    """The phase a mark's text starts, or None if it starts none."""
    if mark.startswith(PHASE_MARK):
        return mark[len(PHASE_MARK):].strip() or None
    return PHASE_OF_MARK.get(mark.split()[0]) if mark.strip() else None


def _tally(counter: dict, key) -> None:
    counter[key] = counter.get(key, 0) + 1


def summarize(header: dict, events: list[dict]) -> dict:
    """Counts per class and per phase, and the details that answer "how often is the ITS
    touched": GITS accesses by register, commands by type (and errors), vCPU stops and their
    time, Python translations by path and result, interrupts by device, route changes."""
    phases: dict[str, dict] = {}
    order: list[str] = []
    phase, since = FIRST_PHASE, 0.0

    def bucket(name: str) -> dict:
        if name not in phases:
            order.append(name)
            phases[name] = {"start": None, "end": None, "counts": {}, "mmio": {}, "commands": {},
                            "command_errors": {}, "stops": {"count": 0, "held": 0.0, "wait": 0.0, "max_held": 0.0},
                            "translations": {}, "irqs": {}, "routes": {"msi_routes": 0, "its_routes": 0}}
        return phases[name]

    for ev in events:
        cls = ev["class"]
        if cls == "mark":
            new = phase_of(ev.get("text", ""))
            if new is not None:
                phase, since = new, ev["t"]
        b = bucket(phase)
        b["start"] = since if b["start"] is None else b["start"]
        b["end"] = ev["t"]
        _tally(b["counts"], cls)
        if cls == "its_mmio":
            _tally(b["mmio"], f"{ev.get('reg')} {ev.get('rw')}")
        elif cls == "its_cmd":
            _tally(b["commands"], ev.get("cmd"))
            if ev.get("error"):
                _tally(b["command_errors"], f"{ev.get('cmd')} {ev.get('error_name')}")
        elif cls == "its_stop":
            s = b["stops"]
            s["count"] += 1
            s["held"] += ev.get("held", 0.0)
            s["wait"] += ev.get("wait", 0.0)
            s["max_held"] = max(s["max_held"], ev.get("held", 0.0))
        elif cls == "its_translate":
            _tally(b["translations"], f"{ev.get('path')} {ev.get('result')}")
        elif cls == "irq":
            _tally(b["irqs"], f"{ev.get('device')}{'' if ev.get('sent') else ' (dropped)'}")
        elif cls in ("msi_routes", "its_routes"):
            b["routes"][cls] += 1
    totals: dict[str, int] = collections.Counter()
    for b in phases.values():
        totals.update(b["counts"])
        b["seconds"] = 0.0 if b["start"] is None else round(b["end"] - b["start"], 6)
        b["stops"]["held"] = round(b["stops"]["held"], 6)
        b["stops"]["wait"] = round(b["stops"]["wait"], 6)
    return {"its": header.get("its"), "note": header.get("note"), "classes": header.get("classes"),
            "events": len(events), "totals": dict(totals), "phases": [dict(name=n, **phases[n]) for n in order]}


def format_summary(summary: dict) -> str:
    """summarize()'s answer as text: a line per class per phase, then the details."""
    lines = [f"trace of the {summary['its']} ITS: {summary['events']} events; classes {', '.join(summary['classes'] or [])}",
             f"  ({summary['note']})"]
    for p in summary["phases"]:
        lines.append(f"\n== phase {p['name']}: {p['seconds']:.3f} s")
        for cls, n in sorted(p["counts"].items()):
            lines.append(f"  {cls:14s} {n:8d}")
        for title, key in (("GITS accesses", "mmio"), ("commands", "commands"), ("command errors", "command_errors"),
                           ("Python translations", "translations"), ("device interrupts", "irqs")):
            if p[key]:
                lines.append(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in sorted(p[key].items())))
        s = p["stops"]
        if s["count"]:
            lines.append(f"  vCPU stops: {s['count']}, {s['held'] * 1000:.1f} ms held in all (max "
                         f"{s['max_held'] * 1000:.2f} ms), {s['wait'] * 1000:.1f} ms getting the vCPUs out")
    return "\n".join(lines)
