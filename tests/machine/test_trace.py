"""kvmits.machine.trace: the SPEC, the event lines, the hooks into the userspace ITS (over the
host stand-ins of test_hidden_its), the console marks, reading and summarizing a trace, and a
real Linux boot's trace (tests/data, recorded in the testbed) replayed through `summarize`."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmits.its import commands as C
from kvmits.its.registers import GITS_CWRITER, GITS_TRANSLATER, GITS_TYPER
from kvmits.machine.bus import MmioBus
from kvmits.machine.trace import (
    CLASSES, USER_ITS_CLASSES, ConsoleMarks, TraceFormatError, Tracer, TracedFrame, format_summary, parse_spec,
    read_trace, summarize,
)
from tests.machine.test_hidden_its import ITS, Rig

DATA = Path(__file__).resolve().parents[1] / "data"
LINUX_TRACE = DATA / "linux-boot-user-trace.jsonl.gz"
ROOT = Path(__file__).resolve().parents[2]


# -- SPEC ----------------------------------------------------------------------------------------------
def test_spec_selects_names_globs_and_removals():
    assert parse_spec("all") == frozenset(CLASSES) == parse_spec("*")
    assert parse_spec("its_*") == USER_ITS_CLASSES
    assert parse_spec("all,-its_mmio") == frozenset(CLASSES) - {"its_mmio"}
    assert parse_spec("irq, mark") == {"irq", "mark"}


@pytest.mark.parametrize("spec, word", [("gicv3_its_*", "matches none"), ("", "selects no class"),
                                        ("irq,-irq", "selects no class"), ("-nothing", "matches none")])
def test_a_bad_spec_is_refused_naming_the_classes(spec, word):
    with pytest.raises(ValueError, match=word) as e:
        parse_spec(spec)
    if word == "matches none":
        assert "its_cmd" in str(e.value)


# -- events ------------------------------------------------------------------------------------------------
def lines_of(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_each_event_is_one_json_line_with_time_class_and_the_vcpu_of_its_thread():
    out = io.StringIO()
    clock = iter([10.0, 10.5, 11.25]).__next__
    t = Tracer(out, {"irq"}, clock=clock)
    t._header("user")
    th = threading.Thread(target=lambda: t.emit("irq", device="d", vector=1), name="vcpu3")
    th.start()
    th.join()
    t.emit("irq", device="d", vector=2)
    header, first, second = lines_of(out)
    assert header["format"] == "kvmits-trace" and header["its"] == "user" and header["classes"] == ["irq"]
    assert first == {"t": 0.5, "class": "irq", "vcpu": 3, "device": "d", "vector": 1}
    assert second["t"] == 1.25 and second["vcpu"] is None
    assert t.events == 2


def test_unknown_classes_are_refused():
    with pytest.raises(ValueError, match="unknown trace classes"):
        Tracer(io.StringIO(), {"its_cmd", "gicv3"})


class Frame:
    def __init__(self):
        self.calls = []

    def mmio_read(self, vcpu, offset, size):
        self.calls.append(("r", offset))
        return 0x1234

    def mmio_write(self, vcpu, offset, size, value):
        self.calls.append(("w", offset, value))


def test_a_traced_frame_passes_every_access_through_and_names_the_register():
    out = io.StringIO()
    frame = Frame()
    traced = TracedFrame(frame, Tracer(out, {"its_mmio"}))
    assert traced.mmio_read(0, GITS_TYPER + 4, 4) == 0x1234
    traced.mmio_write(1, GITS_CWRITER, 8, 0x40)
    assert frame.calls == [("r", GITS_TYPER + 4), ("w", GITS_CWRITER, 0x40)]
    read, write = lines_of(out)
    assert (read["reg"], read["rw"], read["size"], read["value"]) == ("GITS_TYPER[63:32]", "r", 4, 0x1234)
    assert (write["reg"], write["rw"], write["off"], write["value"]) == ("GITS_CWRITER", "w", GITS_CWRITER, 0x40)


def test_console_marks_pass_bytes_through_and_trace_kvmits_lines_split_across_writes():
    out, trace = io.BytesIO(), io.StringIO()
    console = ConsoleMarks(out, Tracer(trace, {"mark"}))
    for chunk in (b"hello\r\nKVMITS-PHA", b"SE io\r\n", b"x KVMITS-NOT-A-MARK\n", b"KVMITS-GUEST-READY\n"):
        console.write(chunk)
    assert out.getvalue() == b"hello\r\nKVMITS-PHASE io\r\nx KVMITS-NOT-A-MARK\nKVMITS-GUEST-READY\n"
    assert [e["text"] for e in lines_of(trace)] == ["KVMITS-PHASE io", "KVMITS-GUEST-READY"]


def test_console_marks_do_nothing_unless_marks_are_traced():
    out, trace = io.BytesIO(), io.StringIO()
    ConsoleMarks(out, Tracer(trace, {"irq"})).write(b"KVMITS-PHASE io\n")
    assert out.getvalue() == b"KVMITS-PHASE io\n" and trace.getvalue() == ""


# -- hooks into the userspace ITS -------------------------------------------------------------------------------
@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def attach(rig, classes):
    bus = MmioBus()
    bus.add(ITS, 0x20000, rig.frame, "its (user)")
    machine = SimpleNamespace(its=rig.frame, msi=None, bus=bus)
    out = io.StringIO()
    tracer = Tracer(out, classes)
    tracer.attach(machine)
    rig.guest.frame = bus.find(ITS)[1]         # the guest's accesses go through the bus's device
    return tracer, out, bus


def test_commands_stops_accesses_and_translations_of_the_userspace_its_are_traced(rig):
    tracer, out, bus = attach(rig, {"its_mmio", "its_cmd", "its_stop", "its_translate"})
    assert isinstance(bus.find(ITS)[1], TracedFrame)
    dev = rig.its.mapd(0x20, 2)
    rig.its.mapti(0x20, 1, 8200, 1)
    rig.its.mapti(0x20, 2, 8201, 7)          # collection 7 is not mapped: the MSI misses
    rig.frame.signal_msi(0x20, 1)
    rig.frame.signal_msi(0x20, 2)
    assert dev is not None
    events = lines_of(out)[1:]
    cmds = [e for e in events if e["class"] == "its_cmd"]
    assert [c["cmd"] for c in cmds][-3:] == ["MAPD", "MAPTI", "MAPTI"]
    assert cmds[-2]["fields"] == {"devid": 0x20, "eventid": 1, "intid": 8200, "icid": 1}
    assert all(c["error"] == 0 and c["error_name"] is None for c in cmds[-3:])
    stops = [e for e in events if e["class"] == "its_stop"]
    assert stops and stops[-1]["commands"] >= 1 and stops[-1]["held"] >= stops[-1]["wait"] >= 0
    assert stops[-1]["vcpus"] == rig.frame.nr_vcpus
    cwriter = [e for e in events if e["class"] == "its_mmio" and e["reg"] == "GITS_CWRITER" and e["rw"] == "w"]
    assert len(cwriter) >= 3
    hit, miss = [e for e in events if e["class"] == "its_translate"]
    assert (hit["intid"], hit["target"], hit["result"], hit["path"]) == (8200, 1, "translated", "signal_msi")
    assert (miss["intid"], miss["result"]) == (None, "collection-unmapped")


def test_a_failed_command_is_traced_with_its_error_name(rig):
    tracer, out, bus = attach(rig, {"its_cmd"})
    rig.its.submit(C.encode_mapti(0x99, 0, 8192, 0))          # no such device
    (cmd,) = [e for e in lines_of(out)[1:] if e["class"] == "its_cmd"]
    assert cmd["cmd"] == "MAPTI" and cmd["error"] and cmd["error_name"].startswith("E_ITS_MAPTI")


def test_detach_leaves_nothing_behind(rig):
    before = (list(rig.model.command_observers), list(rig.model.translation_observers), list(rig.frame.stop_observers))
    tracer, out, bus = attach(rig, set(CLASSES) - {"its_routes"})
    assert len(rig.model.command_observers) == len(before[0]) + 1 and rig.model.translation_observers
    tracer.detach()
    after = (list(rig.model.command_observers), list(rig.model.translation_observers), list(rig.frame.stop_observers))
    assert after == before
    assert bus.find(ITS)[1] is rig.frame
    rig.guest.frame = rig.frame
    n = len(out.getvalue())
    rig.its.mapd(0x21, 2)
    assert len(out.getvalue()) == n                           # nothing traced any more


def test_a_cpu_write_to_gits_translater_is_a_translater_translation(rig):
    tracer, out, bus = attach(rig, {"its_translate"})
    rig.its.mapd(0x0, 2)
    rig.its.mapti(0x0, 1, 8300, 2)
    th = threading.Thread(target=lambda: rig.guest.write(ITS + GITS_TRANSLATER, 4, 1), name="vcpu2")
    th.start()
    th.join()
    (e,) = [e for e in lines_of(out)[1:] if e["class"] == "its_translate"]
    assert (e["path"], e["vcpu"], e["intid"]) == ("translater", 2, 8300)


# -- reading and summarizing --------------------------------------------------------------------------------------
def header(**kw):
    return json.dumps({"class": "trace", "format": "kvmits-trace", "version": 1, "its": "user", "classes": ["mark"],
                       "start": 0.0, "note": "n", **kw})


@pytest.mark.parametrize("lines, word", [
    ([], "no trace header"),
    (['{"t": 0, "class": "mark", "vcpu": null, "text": "x"}'], "before the trace header"),
    ([header(), "{nope"], "not JSON"),
    ([header(version=2)], "this kvmits reads"),
    ([header(), '{"t": 0, "class": "gicv3", "vcpu": null}'], "is not a trace event"),
    ([header(), '[1, 2]'], "no 'class'"),
])
def test_a_file_that_is_not_a_trace_is_refused_with_the_line(lines, word):
    with pytest.raises(TraceFormatError, match=word):
        read_trace(lines)


def ev(t, cls, **kw):
    return {"t": t, "class": cls, "vcpu": 0, **kw}


def test_summarize_counts_per_class_and_per_phase():
    events = [ev(0.1, "its_mmio", reg="GITS_CWRITER", rw="w"), ev(0.2, "its_cmd", cmd="MAPD", error=0),
              ev(0.3, "its_stop", wait=0.001, held=0.004), ev(0.5, "mark", text="KVMITS-GUEST-INIT"),
              ev(1.0, "mark", text="KVMITS-GUEST-READY"), ev(1.5, "mark", text="KVMITS-PHASE io"),
              ev(1.6, "irq", device="virtio-blk0", sent=True), ev(1.7, "irq", device="virtio-blk0", sent=False),
              ev(1.8, "its_cmd", cmd="MOVI", error=0x10, error_name="E_X"),
              ev(1.9, "its_translate", path="irqfd_slow_path", result="no-ite"),
              ev(2.0, "mark", text="KVMITS-GUEST-DONE rc=0")]
    s = summarize({"its": "user", "note": "n", "classes": list(CLASSES)}, events)
    phases = {p["name"]: p for p in s["phases"]}
    assert list(phases) == ["boot", "job", "io", "shutdown"]
    assert phases["boot"]["counts"] == {"its_mmio": 1, "its_cmd": 1, "its_stop": 1, "mark": 1}
    assert phases["boot"]["mmio"] == {"GITS_CWRITER w": 1} and phases["boot"]["commands"] == {"MAPD": 1}
    assert phases["boot"]["stops"] == {"count": 1, "held": 0.004, "wait": 0.001, "max_held": 0.004}
    assert phases["io"]["irqs"] == {"virtio-blk0": 1, "virtio-blk0 (dropped)": 1}
    assert phases["io"]["command_errors"] == {"MOVI E_X": 1}
    assert phases["io"]["translations"] == {"irqfd_slow_path no-ite": 1}
    assert phases["io"]["seconds"] == pytest.approx(0.4)
    assert s["totals"]["mark"] == 4 and s["events"] == len(events)
    text = format_summary(s)
    assert "== phase io" in text and "vCPU stops: 1, 4.0 ms held" in text


def test_a_linux_boot_trace_replays_through_summarize_and_the_cli():
    """A real trace: `kvmits run --trace all` of the nested Linux guest (6.1, 4 vCPUs, virtio-blk
    and rng, the userspace ITS), recorded in the testbed (tests/data/README.md says how)."""
    with gzip.open(LINUX_TRACE, "rt") as f:
        head, events = read_trace(f)
    assert head["its"] == "user" and set(head["classes"]) == set(CLASSES)
    s = summarize(head, events)
    phases = {p["name"]: p for p in s["phases"]}
    assert {"boot", "job", "shutdown"} <= set(phases)
    boot = phases["boot"]
    assert boot["commands"].get("MAPD", 0) >= 2 and boot["commands"].get("MAPTI", 0) >= 5, boot["commands"]
    assert boot["stops"]["count"] >= 1 and boot["mmio"].get("GITS_CWRITER w", 0) >= 1
    assert sum(phases["job"]["irqs"].values()) > 0                 # the job's I/O completed by interrupts
    assert not any(p["translations"] for p in phases.values())    # no Python translation anywhere
    plain = tmp_copy = None
    try:
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as tmp:
            with gzip.open(LINUX_TRACE, "rt") as f:
                tmp.write(f.read())
            tmp_copy = tmp.name
        plain = subprocess.run([sys.executable, "-m", "kvmits", "trace", "summarize", tmp_copy],
                               capture_output=True, text=True, cwd=ROOT, check=False)
    finally:
        if tmp_copy:
            Path(tmp_copy).unlink()
    assert plain.returncode == 0, plain.stderr
    assert "== phase boot" in plain.stdout and "MAPTI" in plain.stdout


def test_summarize_of_a_file_that_is_not_a_trace_exits_2(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text("hello\n")
    out = subprocess.run([sys.executable, "-m", "kvmits", "trace", "summarize", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 2 and "line 1: not JSON" in out.stderr
