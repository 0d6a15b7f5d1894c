"""kvmits soak (kvmits.bench.soak, kvmits.cli.soak) without arm64 KVM: the job, the console's
parsing (also of a real native iogen's lines), the VMM samples, the stall and failure logic, the
report, the command line and its hand-off to the testbed, and one soak run's loop on a scripted
machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types

import pytest

from kvmits.bench import linux, soak
from kvmits.cli import build_parser
from kvmits.cli import soak as cli_soak
from kvmits.machine.runner import EXIT_POWEROFF, EXIT_STOPPED, MachineExit
from tests.test_iogen import disk, iogen, vdisk  # noqa: F401  (fixtures: a native iogen, O_DIRECT files)

CONFIG = soak.SoakConfig(minutes=3, qd=8, churn_hz=20, stall_s=10, progress_s=10)


def progress(t, phase="mixed", ios=0, **kw) -> dict:
    p = {"t": t, "phase": phase, "ios": ios, "reads": ios // 2, "writes": ios - ios // 2, "errors": 0,
         "corrupt": 0, "stalled": 0, "inflight": 8, "stalled_now": 0, "oldest_ms": 5.0,
         "moves": int(t * 20), "move_failures": 0}
    p.update(kw)
    return p


def final(**kw) -> dict:
    f = {"device": "/dev/vda", "bs": 4096, "qd": 8, "seconds": 200.0, "ios": 400000, "errors": 0,
         "first_error": None, "lost": 0, "stalled": 0, "stall_seconds": 10, "iops": 2000.0,
         "lat_us": {"mean": 4000.0, "p50": 3500.0, "p99": 9000.0, "max": 40000.0},
         "churn": {"irqs": [33], "hz": 20, "moves": 3600, "move_failures": 0, "first_errno": None},
         "verify": {"blocks": 16384, "write_pct": 50, "phase": "sweep", "reads": 200000, "writes": 200000,
                    "fill_writes": 16384, "sweep_reads": 16384, "unverified": 0, "corrupt": 0, "stale": 0,
                    "misdirected": 0, "damaged": 0, "corrupt_blocks": []}}
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(f.get(k), dict):
            f[k] = dict(f[k], **v)
        else:
            f[k] = v
    return f


def line(mark: str, record: dict) -> bytes:
    return (mark + json.dumps(record) + "\r\n").encode()


# -- the job -----------------------------------------------------------------------------------------
def test_job_runs_iogen_verify_with_churn_on_the_shared_vector():
    job = soak.job(CONFIG)
    assert linux.IRQS_SH in job and "irqs start" in job and "irqs end" in job
    assert f"grep -m1 '{soak.IRQ_NAME}' /proc/interrupts" in job
    (cmd,) = [ln for ln in job.splitlines() if ln.startswith(f"/{linux.IOGEN_GUEST_PATH} ")]
    assert cmd.split()[1] == "/dev/vda"
    assert " --verify --qd 8 --seconds 180 --progress 10 --stall-seconds 10 " in cmd
    assert cmd.endswith(' --churn "$irq" --churn-hz 20 --cpus 4')
    assert job.rstrip().endswith("exit $rc")            # the job's status is iogen's
    assert f"rc=$?\nsleep {soak.END_WAIT_S}\n" in job   # the host samples the VMM while it runs
    assert subprocess.run(["sh", "-n"], input=job, text=True).returncode == 0


def test_job_without_churn_looks_up_no_vector():
    job = soak.job(soak.SoakConfig(minutes=1, churn_hz=0))
    assert "--churn" not in job and "grep" not in job
    assert subprocess.run(["sh", "-n"], input=job, text=True).returncode == 0


@pytest.mark.parametrize("kw", [{"minutes": 0}, {"qd": 0}, {"qd": 4097}, {"churn_hz": -1}, {"stall_s": 0}])
def test_config_refuses_nonsense(kw):
    with pytest.raises(ValueError):
        soak.SoakConfig(**kw)


def test_testbed_timeout_covers_every_run():
    config = soak.SoakConfig(minutes=10)
    assert config.run_limit_s > 600
    assert soak.testbed_timeout(config, 2) > 2 * config.run_limit_s


# -- the console -------------------------------------------------------------------------------------
IRQ_TABLE = ("           CPU0       CPU1       CPU2       CPU3\r\n"
             " 33:        {0}          {1}          0          0  ITS-PCI-MSIX-0000:00:01.0   0 Edge      "
             "virtio0-virtqueues\r\n")


def test_monitor_parses_progress_final_and_sections_across_chunks():
    mon = soak.SoakMonitor(CONFIG)
    data = (b"KVMITS-GUEST-READY\r\n== interrupts start\r\n" + IRQ_TABLE.format(5, 0).encode() + b"== end\r\n"
            + line(soak.PROGRESS_MARK, progress(10.0, "fill", 1000))
            + line(soak.PROGRESS_MARK, progress(20.0, "mixed", 3000))
            + line(linux.IOGEN_MARK, final()) + b"== interrupts end\r\n" + IRQ_TABLE.format(105, 50).encode()
            + b"== end\r\nKVMITS-SOAK a note\r\n")
    got = []
    for i in range(0, len(data), 7):                      # 7-byte chunks: lines split anywhere
        got += mon.feed(data[i:i + 7], now=float(i))
    assert [p["t"] for p in got] == [10.0, 20.0] and [p["t"] for p in mon.progress] == [10.0, 20.0]
    assert mon.phase == "mixed" and mon.last_progress_at == mon.progress[-1]["host_t"]
    assert mon.final == final()
    assert mon.sections.tables["start"]["virtio0-virtqueues"] == [5, 0, 0, 0]
    assert linux.interrupt_delta(mon.sections.tables, "start", "end", soak.IRQ) == [100, 50, 0, 0]
    assert mon.notes == ["a note"] and mon.bad_lines == []


@pytest.mark.parametrize("bad", [
    soak.PROGRESS_MARK + "{not json",
    soak.PROGRESS_MARK + "[1, 2]",
    soak.PROGRESS_MARK + json.dumps({k: v for k, v in progress(1.0).items() if k != "moves"}),
    soak.PROGRESS_MARK + json.dumps(dict(progress(1.0), ios="12")),
    soak.PROGRESS_MARK + json.dumps(progress(1.0, corrupt=True)),
    soak.PROGRESS_MARK + json.dumps(progress(1.0, phase=3)),
    linux.IOGEN_MARK + json.dumps(final(verify=None)),
    linux.IOGEN_MARK + json.dumps(final(ios=None)),
    linux.IOGEN_MARK + json.dumps(final(churn={"moves": "many"})),
    linux.IOGEN_MARK + json.dumps(final(verify={"corrupt_blocks": 3})),
    linux.IOGEN_MARK + "\xff\xfe",
])
def test_monitor_keeps_malformed_guest_lines_without_raising(bad):
    mon = soak.SoakMonitor(CONFIG)
    assert mon.feed(bad.encode("utf-8", "surrogateescape") + b"\n", 1.0) == []
    assert mon.progress == [] and mon.final is None and len(mon.bad_lines) == 1


def test_monitor_cuts_an_endless_line():
    mon = soak.SoakMonitor(CONFIG)
    mon.feed(b"x" * (3 * soak.LINE_MAX), 1.0)
    mon.feed(b"y" * soak.LINE_MAX + b"\n" + line(soak.PROGRESS_MARK, progress(10.0)), 2.0)
    assert len(mon._partial) == 0 and len(mon.progress) == 1


def test_console_tap_keeps_head_and_tail():
    tap = soak.ConsoleTap(head=10, tail=10)
    tap.write(b"0123456789abcdef")
    assert tap.take() == b"0123456789abcdef"
    tap.write(b"ghijklmnopqrstuvwxyz")
    tap.take()
    assert bytes(tap.head) == b"0123456789" and bytes(tap.tail) == b"qrstuvwxyz" and tap.dropped == 16
    assert tap.text() == "0123456789\n[... 16 console bytes not kept ...]\nqrstuvwxyz"
    assert tap.take() == b""


def test_monitor_reads_a_real_iogen_run(iogen, vdisk):  # noqa: F811
    # the format contract between guests/linux/iogen.c and the soak: a native iogen's lines
    r = subprocess.run([str(iogen), str(vdisk), "--verify", "--qd", "4", "--seconds", "0.4", "--progress", "0.1",
                        "--churn", "999999", "--churn-hz", "50", "--cpus", "2"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    mon = soak.SoakMonitor(CONFIG)
    mon.feed(r.stdout, 1.0)
    assert mon.bad_lines == [] and len(mon.progress) >= 3 and mon.final is not None
    assert mon.final["verify"]["phase"] == "sweep"
    config = soak.SoakConfig(minutes=0.4 / 60, qd=4, churn_hz=50, stall_s=10, progress_s=0.1)
    run = {"iogen": mon.final, "progress": mon.progress, "iogen_rc": 0}
    # churn on an IRQ that does not exist: every move failed, and the soak says so
    assert failures_of(run, config) == ["move_failures", "no_moves"]


# -- hung guests, stalls and failures -------------------------------------------------------------------
def test_hung_before_and_after_the_first_progress_line():
    mon = soak.SoakMonitor(CONFIG)
    assert mon.hung(soak.FIRST_PROGRESS_S - 1) is None
    assert "within 300 s of KVM_RUN" in mon.hung(soak.FIRST_PROGRESS_S + 1)
    mon.feed(line(soak.PROGRESS_MARK, progress(10.0)), 100.0)
    assert mon.hung(100.0 + CONFIG.silence_s - 1) is None
    assert "no progress line from iogen for 121 s" in mon.hung(100.0 + CONFIG.silence_s + 1)
    mon.feed(line(linux.IOGEN_MARK, final()), 300.0)
    assert mon.hung(10_000.0) is None                    # iogen is done


def test_silence_bound_grows_with_the_progress_period():
    assert soak.SoakConfig(progress_s=10).silence_s == soak.SILENCE_MIN_S
    assert soak.SoakConfig(progress_s=60).silence_s == 360


def clean_run() -> dict:
    return {"its": "user", "iogen": final(), "iogen_rc": 0,
            "progress": [progress(float(t), ios=100 * t) for t in range(10, 200, 10)]}


#: a word for each failure message, to check which ones a run gets
KINDS = {"stopped by the host": "stopped", "the guest's run": "guest", "the job:": "note",
         "printed no final report": "no_final", "I/O errors": "errors", "corrupt blocks": "corrupt",
         "completed only after": "stalled", "never completed": "lost", "no I/O completed": "no_io",
         "before the read-back sweep": "no_sweep", "no affinity churn": "no_churn",
         "affinity moves failed": "move_failures", "no affinity move succeeded": "no_moves",
         "exited with status": "rc", "without a route to the ITS": "unrouted", "could not complete": "bad_requests",
         "the hidden ITS dropped": "hidden_dropped", "a stall at": "stall_seen", "printed no progress for": "gap",
         "malformed iogen lines": "bad_lines"}


def failures_of(run: dict, config: soak.SoakConfig = CONFIG) -> list[str]:
    out = []
    for why in soak.failures(run, config):
        (kind,) = [k for text, k in KINDS.items() if text in why]
        out.append(kind)
    return out


def test_a_clean_run_passes():
    assert soak.failures(clean_run(), CONFIG) == []


@pytest.mark.parametrize("change, kinds", [
    ({"stopped": "hung"}, ["stopped"]),
    ({"guest_problem": "no DONE"}, ["guest"]),
    ({"notes": ["no virtio0-virtqueues"]}, ["note"]),
    ({"iogen": None}, ["no_final"]),
    ({"iogen": final(errors=2, first_error=-5)}, ["errors"]),
    ({"iogen": final(verify={"corrupt": 3, "stale": 1, "damaged": 2, "corrupt_blocks": [7, 9, 11]})}, ["corrupt"]),
    ({"iogen": final(stalled=1)}, ["stalled"]),
    ({"iogen": final(lost=1, verify={"phase": "mixed"})}, ["lost", "no_sweep"]),
    ({"iogen": final(ios=0)}, ["no_io"]),
    ({"iogen": final(churn=None)}, ["no_churn"]),
    ({"iogen": final(churn={"moves": 0, "move_failures": 10, "first_errno": 5})}, ["move_failures", "no_moves"]),
    ({"iogen_rc": 2}, ["rc"]),
    ({"progress": [progress(10.0), progress(20.0, stalled_now=1, oldest_ms=12000.0)]}, ["stall_seen"]),
    ({"progress": [progress(10.0), progress(31.0)]}, ["gap"]),
    ({"bad_lines": ["KVMITS-IOGEN-PROGRESS {"]}, ["bad_lines"]),
    ({"devices": {"delta": {"virtio-blk0": {"msis_unrouted": 1, "msis_bad_address": 0, "bad_requests": 0}}}},
     ["unrouted"]),
    ({"devices": {"delta": {"virtio-blk0": {"msis_unrouted": 0, "msis_bad_address": 2}}}}, ["unrouted"]),
    ({"devices": {"delta": {"virtio-blk0": {"msis_unrouted": 0, "bad_requests": 1}}}}, ["bad_requests"]),
    ({"its_stats": {"delta": {"vcpu_stops": 100, "msis_dropped": 3}}}, ["hidden_dropped"]),
    ({"its_stats": {"delta": {"vcpu_stops": 100, "msis_dropped": 0}},
      "devices": {"delta": {"virtio-blk0": {"msis_unrouted": 0, "msis_bad_address": 0, "bad_requests": 0}}}}, []),
])
def test_each_failure_is_named(change, kinds):
    run = dict(clean_run(), **change)
    assert failures_of(run) == kinds


def test_failure_messages_say_what_and_where():
    run = dict(clean_run(), iogen=final(verify={"corrupt": 3, "stale": 1, "damaged": 2, "corrupt_blocks": [7, 9, 11]}),
               progress=[progress(10.0), progress(20.0, stalled_now=2, oldest_ms=12500.0)])
    text = "\n".join(soak.failures(run, CONFIG))
    assert "3 corrupt blocks: 1 stale, 0 misdirected, 2 damaged; the first: [7, 9, 11]" in text
    assert "a stall at t=20 s: 2 I/Os outstanding for more than 10 s (the oldest 12.5 s)" in text


def test_churn_is_not_required_without_churn():
    assert soak.failures(dict(clean_run(), iogen=final(churn=None)), soak.SoakConfig(churn_hz=0)) == []


def test_max_gap_counts_from_iogen_start():
    assert soak.max_gap([]) is None
    assert soak.max_gap([progress(25.0), progress(35.0)]) == (25.0, 25.0)
    assert soak.max_gap([progress(10.0), progress(20.0), progress(45.0)]) == (25.0, 45.0)


# -- throughput over time ------------------------------------------------------------------------------
def test_buckets_give_each_minutes_rate_and_phases():
    lines = [progress(10.0, "fill", 1000, moves=200), progress(50.0, "mixed", 5000, moves=1000),
             progress(60.0, "mixed", 6000, moves=1200), progress(110.0, "mixed", 12000, moves=2200),
             progress(170.0, "mixed", 15000, moves=3400), progress(180.0, "sweep", 16000, moves=3600)]
    b = soak.buckets(lines)
    assert [x["bucket"] for x in b] == [0, 1, 2, 3]
    assert [x["ios"] for x in b] == [5000, 7000, 3000, 1000]
    assert [x["iops"] for x in b] == [100.0, 116.7, 50.0, 100.0]
    assert [x["moves"] for x in b] == [1000, 1200, 1200, 200]
    assert [x["phases"] for x in b] == [["fill", "mixed"], ["mixed"], ["mixed"], ["sweep"]]
    t = soak.throughput(b)
    assert t == {"buckets": 2, "min": 50.0, "median": 83.35, "max": 116.7, "min_over_median": 0.6}
    assert soak.throughput([]) == {"buckets": 0}


# -- the VMM process -----------------------------------------------------------------------------------
def test_process_sample_reads_status_and_fds(tmp_path):
    proc = tmp_path / "proc"
    (proc / "fd").mkdir(parents=True)
    for n in range(5):
        (proc / "fd" / str(n)).write_text("")
    (proc / "status").write_text("Name:\tpython3\nVmRSS:\t  700000 kB\nRssAnon:\t   60000 kB\nRssFile:\t   "
                                 "40000 kB\nRssShmem:\t  600000 kB\nThreads:\t12\n")
    assert soak.process_sample(str(proc)) == {"rss_kb": 700000, "anon_kb": 60000, "file_kb": 40000,
                                              "shmem_kb": 600000, "threads": 12, "fds": 5}


def test_process_sample_of_this_process_sees_an_fd_open():
    before = soak.process_sample()
    assert before["rss_kb"] >= before["anon_kb"] > 0 and before["threads"] >= 1
    r, w = os.pipe()
    try:
        assert soak.process_sample()["fds"] == before["fds"] + 2
    finally:
        os.close(r)
        os.close(w)


def sample(t, phase, anon=60000, fds=40, threads=9, **kw):
    return dict({"rss_kb": anon + 500000, "anon_kb": anon, "file_kb": 1, "shmem_kb": 500000, "threads": threads,
                 "fds": fds, "t": t, "phase": phase}, **kw)


def test_process_summary_judges_the_steady_part():
    samples = [sample(0.0, None, anon=30000, fds=20, threads=3), sample(60.0, "fill", anon=50000),
               sample(120.0, "mixed", anon=60000), sample(180.0, "mixed", anon=61000), sample(200.0, "end", anon=61500)]
    s = soak.process_summary(samples)
    assert s["start"]["t"] == 0.0 and s["steady"]["t"] == 120.0 and s["end"]["t"] == 200.0
    assert s["growth"] == {"rss_kb": 1500, "anon_kb": 1500, "shmem_kb": 0, "fds": 0, "threads": 0}
    assert s["flat"] == {"fds": True, "threads": True, "anon": True}
    after = soak.process_summary(samples + [sample(210.0, soak.AFTER, anon=50000, threads=2)])
    assert after["end"]["t"] == 200.0 and after["flat"]["threads"]      # the machine's end is not compared
    leaky = samples[:-1] + [sample(200.0, "end", anon=70000, fds=41)]
    assert soak.process_summary(leaky)["flat"] == {"fds": False, "threads": True, "anon": False}
    assert soak.process_summary([]) == {"samples": 0}


def test_delta_of_nested_counters():
    assert soak.delta({"a": 1, "d": {"x": 2}}, {"a": 5, "b": 3, "d": {"x": 7, "y": 1}, "s": "text"}) == \
        {"a": 4, "b": 3, "d": {"x": 5, "y": 1}}


# -- the report ------------------------------------------------------------------------------------------
def result_of(runs) -> dict:
    return {"format": soak.FORMAT, "version": soak.VERSION, "config": {"minutes": 3.0, "qd": 8, "churn_hz": 20.0,
            "stall_s": 10.0}, "guest_kernel": "6.1.0-57-arm64", "cpus": 4, "ok": all(r["ok"] for r in runs),
            "runs": runs}


def report_run(its, **kw):
    run = clean_run()
    run.update(its=its, buckets=soak.buckets(run["progress"]),
               process=soak.process_summary([sample(0.0, None, fds=20, threads=3), sample(60.0, "mixed"),
                                             sample(200.0, "end", anon=61000)]),
               its_stats={"delta": {} if its == "kernel" else {"vcpu_stops": 7200, "commands": 7202,
                                                              "python_msis": 0, "slow_path_msis": 0}},
               devices={"delta": {"virtio-blk0": {"reads": 200001, "writes": 200002, "msis_fired": 90000,
                                                  "msis_unrouted": 0}}},
               interrupts=[10, 20, 30, 40])
    run.update(kw)
    run["throughput"] = soak.throughput(run["buckets"])
    run["failures"] = soak.failures(run, CONFIG)
    run["ok"] = not run["failures"]
    return run


def test_report_as_text():
    result = result_of([report_run("kernel"), report_run("user", iogen=final(lost=1))])
    text = soak.format_report(result, emulated=True)
    rows = {ln.split("  ")[0]: ln for ln in text.splitlines()}
    assert "kernel ITS" in text.splitlines()[2] and "userspace ITS" in text.splitlines()[2]
    assert rows["verdict"].split()[-2:] == ["PASS", "FAIL"]
    assert rows["I/O done (reads / writes)"].count("400,000 (200,000 / 200,000)") == 2
    assert rows["stalled I/O (> stall bound) / lost I/O"].split()[-3:] == ["0", "/", "1"]
    assert rows["IOPS per minute, mixed phase: min / median / max"].count("100 / 100 / 100") == 2
    assert rows["worst minute / median minute"].split()[-2:] == ["1.00", "1.00"]
    assert "in KVM" in rows["ITS: vCPU stops / commands / Python MSIs / slow path"]
    assert "7,200 / 7,202 / 0 / 0" in rows["ITS: vCPU stops / commands / Python MSIs / slow path"]
    assert "20 / 40 / 40 (flat)" in rows["VMM open fds start / steady / end"]
    assert "+1,000 KiB, flat" in rows["VMM private memory (RssAnon), steady -> end (MiB)"]
    assert "100: 10, 20, 30, 40" in rows["guest interrupts of the disk's vector, per vCPU"]
    assert "userspace ITS: FAIL\n- 1 I/Os never completed" in text
    assert text.endswith("Times are EMULATED (arm64 KVM nested in qemu TCG, the testbed).")
    minute_rows = [ln for ln in text.splitlines() if ln[:1].isdigit()]
    assert len(minute_rows) == 4                          # t = 10..190 s: minutes 1..4


def test_report_as_markdown_has_whole_tables():
    result = result_of([report_run("kernel"), report_run("user")])
    text = soak.format_report(result, markdown=True)
    tables = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(tables) == 2 + len(soak.ROWS) + 2 + 4      # two headers + rules, the rows, four minutes
    assert all(ln.count("|") == 4 for ln in tables)        # label + two ITSes
    assert "| verdict | PASS | PASS |" in text and "FAIL" not in text and "EMULATED" not in text


def test_report_of_a_run_that_never_reported():
    run = {"its": "user", "iogen": None, "progress": [], "buckets": [], "failures": ["x"], "ok": False}
    text = soak.format_report(result_of([run]))
    assert "FAIL" in text and "- x" in text


# -- the command line ----------------------------------------------------------------------------------
def parse(*argv):
    return build_parser().parse_args(["soak", *argv])


def test_cli_defaults_and_options():
    args = parse()
    assert (args.its, args.minutes, args.qd, args.churn_hz, args.stall_seconds, args.json, args.report) == \
        (["kernel", "user"], 10.0, 16, 20.0, 10.0, None, False)
    args = parse("--its", "user", "--minutes", "0.5", "--qd", "32", "--churn-hz", "0", "--json", "x.json", "--report")
    assert (args.its, args.minutes, args.qd, args.churn_hz, args.json, args.report) == \
        (["user"], 0.5, 32, 0.0, "x.json", True)
    assert cli_soak.config_of(args) == soak.SoakConfig(minutes=0.5, qd=32, churn_hz=0.0, stall_s=10.0)


@pytest.mark.parametrize("argv, message", [
    (["--its", "kernel,foo"], "ITS kinds are kernel, user"),
    (["--its", ""], "ITS kinds are kernel, user"),
    (["--its", "user,user"], "given twice"),
    (["--minutes", "0"], "must be > 0"),
    (["--minutes", "ten"], "not a number"),
    (["--qd", "0"], "must be in 1..4096"),
    (["--qd", "5000"], "must be in 1..4096"),
    (["--qd", "1.5"], "not a whole number"),
    (["--churn-hz", "-1"], "must be >= 0"),
    (["--stall-seconds", "0"], "must be > 0"),
])
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_inner_argv_is_the_same_soak_as_json():
    args = parse("--its", "user,kernel", "--minutes", "2.5", "--qd", "4", "--churn-hz", "5", "--stall-seconds", "3",
                 "--report")
    inner = build_parser().parse_args(cli_soak.inner_argv(args))
    assert cli_soak.config_of(inner) == cli_soak.config_of(args) and inner.its == ["user", "kernel"]
    assert inner.json == "-"


def test_find_result_passes_the_rest_through(capsys):
    result = result_of([report_run("kernel")])
    lines = ["kvmits soak: kernel ITS: booting\n", json.dumps(result) + "\r\n", "testbed: done\n"]
    assert cli_soak.find_result(lines) == result
    assert capsys.readouterr().err == "kvmits soak: kernel ITS: booting\ntestbed: done\n"
    assert cli_soak.find_result([cli_soak.JSON_PREFIX + ", broken\n"]) is None


def test_output_status_json_file_and_stdout(tmp_path, capsys):
    good, bad = result_of([report_run("kernel")]), result_of([report_run("user", iogen=final(errors=1))])
    path = tmp_path / "soak.json"
    assert cli_soak.output(parse("--json", str(path)), good, emulated=False) == 0
    assert json.loads(path.read_text())["runs"][0]["its"] == "kernel"
    assert "PASS" in capsys.readouterr().out
    assert cli_soak.output(parse("--json", "-"), bad, emulated=True) == 1
    out, err = capsys.readouterr()
    assert out.startswith(cli_soak.JSON_PREFIX) and json.loads(out)["emulated"] is True
    assert "kvmits soak: user ITS FAILED: 1 I/O errors" in err


def test_cmd_soak_hands_off_to_the_testbed(monkeypatch, capsys):
    # the testbed replaced by a program that prints what the testbed's console would: progress on
    # the way, the result as one line
    result = result_of([report_run("kernel"), report_run("user", iogen=final(stalled=2))])
    script = ("import sys; print('kvmits soak: kernel ITS: booting', file=sys.stderr); "
              f"print({json.dumps(json.dumps(result))}); print('testbed: run ended')")
    seen = {}

    def fake_testbed_command(argv, kernel=None, timeout=None):
        seen.update(argv=argv, kernel=kernel, timeout=timeout)
        return [sys.executable, "-c", script]

    monkeypatch.setattr(cli_soak, "needs_testbed", lambda: True)
    monkeypatch.setattr(cli_soak, "testbed_command", fake_testbed_command)
    args = parse("--minutes", "3", "--report", "--kernel", "trixie")
    assert cli_soak.cmd_soak(args) == 1
    out, err = capsys.readouterr()
    assert seen["argv"][:3] == ["soak", "--its", "kernel,user"] and seen["argv"][-2:] == ["--json", "-"]
    assert seen["kernel"] == "trixie" and seen["timeout"] == soak.testbed_timeout(cli_soak.config_of(args), 2)
    assert "| verdict | PASS | FAIL |" in out and "EMULATED" in out
    assert "testbed: run ended" in err and "user ITS FAILED: 2 I/Os completed only after" in err


def test_cmd_soak_without_a_result_from_the_testbed(monkeypatch, capsys):
    monkeypatch.setattr(cli_soak, "needs_testbed", lambda: True)
    monkeypatch.setattr(cli_soak, "testbed_command",
                        lambda argv, kernel=None, timeout=None: [sys.executable, "-c", "import sys; sys.exit(124)"])
    assert cli_soak.cmd_soak(parse()) == 124
    assert "gave no result (tools/testbed exit status 124)" in capsys.readouterr().err


# -- one run's loop, on a scripted machine -----------------------------------------------------------------
class FakeMachine:
    """What soak_one uses of a Machine: a console the 'guest' (a thread playing `script`) writes
    to, the ITS's and the disk's counters, wait/stop. `script`: (delay s, bytes) steps, then a
    power-off unless `hang`."""

    script: list = []
    hang = False
    fail = None
    made: list = []

    def __init__(self, config, console):
        self.config, self.console = config, console
        stats = {} if config.its == "kernel" else {"vcpu_stops": 0, "slow_path_msis": 0}
        self.its = types.SimpleNamespace(stats=lambda: dict(stats))
        if config.its == "user":
            self.its.model = types.SimpleNamespace(msis=0, commands_processed=0)
        sink = types.SimpleNamespace(fired=0, unrouted=0, bad_address=0)
        fn = types.SimpleNamespace(msix=types.SimpleNamespace(sink=sink, latched=0), no_vector=0, dropped_notifies=0)
        dev = types.SimpleNamespace(reads=0, writes=0, flushes=0, io_errors=0, bad_requests=0)
        self.pci_devices = {"virtio-blk0": types.SimpleNamespace(device=dev, function=fn)}
        self._end = threading.Event()
        self._exit = None
        self.closed = False
        FakeMachine.made.append(self)

    def load(self, image, cmdline, initrd):
        self.loaded = (image, cmdline, initrd)

    def start(self):
        def play():
            for delay, data in self.script:
                if self._end.wait(delay):
                    return
                self.console.write(data)
                self.pci_devices["virtio-blk0"].device.reads += 10
            if self.fail is not None:
                self._exit = self.fail
                self._end.set()
            elif not self.hang:
                self._exit = MachineExit("poweroff", EXIT_POWEROFF, 0)
                self._end.set()
        threading.Thread(target=play, daemon=True).start()

    def wait(self, timeout=None):
        if not self._end.wait(timeout):
            raise TimeoutError("still running")
        if isinstance(self._exit, BaseException):
            raise self._exit
        return self._exit

    def stop(self):
        if self._exit is None:
            self._exit = MachineExit("stopped", EXIT_STOPPED)
        self._end.set()

    def close(self):
        self.closed = True


class FakeGuest:
    image = "/nonexistent/Image"
    kernel_release = "6.1.0-57-arm64"

    def initrd(self, job, files):
        return job.encode() + b"".join(files.values())


BOOT = (b"KVMITS-GUEST-INIT\r\nKVMITS-GUEST-READY\r\n== interrupts start\r\n" + IRQ_TABLE.format(1, 0).encode()
        + b"== end\r\n")
END = b"== interrupts end\r\n" + IRQ_TABLE.format(401, 300).encode() + b"== end\r\nKVMITS-GUEST-DONE rc={rc}\r\n"


@pytest.fixture
def fake_machine(monkeypatch):
    import kvmits.machine

    monkeypatch.setattr(kvmits.machine, "Machine", FakeMachine)
    monkeypatch.setattr(soak, "POLL_S", 0.01)
    monkeypatch.setattr(soak, "SAMPLE_S", 0.05)
    monkeypatch.setattr(soak, "FIRST_PROGRESS_S", 10)     # a test that goes wrong ends soon
    FakeMachine.made, FakeMachine.hang, FakeMachine.fail = [], False, None
    return FakeMachine


def soak_one(its, tmp_path, config=CONFIG):
    said = []
    run = soak.soak_one(its, FakeGuest(), b"IOGEN", config, str(tmp_path), said.append)
    return run, said


@pytest.mark.parametrize("its", ["kernel", "user"])
def test_soak_one_clean_run(fake_machine, tmp_path, its):
    steps = [(0.01, BOOT)]
    steps += [(0.02, line(soak.PROGRESS_MARK, progress(float(t), "mixed", 100 * t))) for t in range(10, 130, 10)]
    steps += [(0.05, line(linux.IOGEN_MARK, final())), (0.05, END.replace(b"{rc}", b"0"))]
    fake_machine.script = steps
    run, said = soak_one(its, tmp_path)
    assert run["ok"], run["failures"]
    m = fake_machine.made[0]
    assert m.closed and not os.path.exists(tmp_path / f"soak-{its}.img")          # the disk goes with the run
    assert m.config.its == its and m.config.cpus == linux.CPUS and m.config.disks[0].vectors == 2
    assert b"--verify" in m.loaded[2] and m.loaded[2].endswith(b"IOGEN")
    assert run["exit"] == {"reason": "poweroff", "status": 0} and run["iogen_rc"] == 0
    assert len(run["progress"]) == 12 and run["iogen"] == final()
    assert [b["bucket"] for b in run["buckets"]] == [0, 1, 2]
    assert run["interrupts"] == [400, 300, 0, 0]
    samples = run["process"]["all"]
    assert samples[0]["t"] == 0.0 and samples[-1]["phase"] == "end" and len(samples) >= 3
    assert run["process"]["flat"]["fds"] in (True, False)            # measured, whatever it says
    assert run["devices"]["delta"]["virtio-blk0"]["reads"] > 0
    assert ("vcpu_stops" in run["its_stats"]["delta"]) == (its == "user")
    assert any("t=60 s" in s for s in said) and any("t=120 s" in s for s in said)


def test_soak_one_reports_corruption_from_the_guest(fake_machine, tmp_path):
    bad = final(verify={"corrupt": 1, "damaged": 1, "corrupt_blocks": [42]})
    fake_machine.script = [(0.01, BOOT), (0.01, line(soak.PROGRESS_MARK, progress(10.0))),
                           (0.01, line(linux.IOGEN_MARK, bad)), (0.01, END.replace(b"{rc}", b"1"))]
    run, _ = soak_one("user", tmp_path)
    assert not run["ok"] and any("corrupt blocks" in f and "[42]" in f for f in run["failures"])
    assert run["console_tail"][-1].startswith("KVMITS-GUEST-DONE rc=1")


def test_soak_one_stops_a_guest_gone_silent(fake_machine, tmp_path, monkeypatch):
    monkeypatch.setattr(soak, "SILENCE_MIN_S", 0.3)
    config = soak.SoakConfig(minutes=3, progress_s=0.01)
    fake_machine.script = [(0.01, BOOT), (0.01, line(soak.PROGRESS_MARK, progress(10.0)))]
    fake_machine.hang = True
    t = time.monotonic()
    run, said = soak_one("kernel", tmp_path, config)
    assert time.monotonic() - t < 30
    assert run["exit"]["reason"] == "stopped" and "no progress line from iogen" in run["stopped"]
    kinds = failures_of(run, config)
    assert kinds[:3] == ["stopped", "guest", "no_final"]
    assert any("stopping the machine" in s for s in said)


def test_soak_one_vmm_failure_is_a_failed_run(fake_machine, tmp_path):
    from kvmits.machine.runner import VcpuExitError

    fake_machine.script = [(0.01, BOOT)]
    fake_machine.fail = VcpuExitError(1, "KVM_EXIT_INTERNAL_ERROR")
    run, _ = soak_one("user", tmp_path)
    assert not run["ok"] and run["exit"] is None
    assert "the VMM failed: VcpuExitError: vCPU 1: unexpected exit 'KVM_EXIT_INTERNAL_ERROR'" in run["guest_problem"]


# -- the refactor shared with part 5 ----------------------------------------------------------------------
def test_part5_parse_output_reads_phases_and_sections():
    console = ("== interrupts start\r\n" + IRQ_TABLE.format(1, 2) + "== end\r\nKVMITS-PHASE churn\r\n"
               + linux.IOGEN_MARK + json.dumps({"ios": 5}) + "\r\n== interrupts churn\r\n" + IRQ_TABLE.format(11, 2)
               + "== end\r\n")
    reports, tables = linux.parse_output(console)
    assert reports == {"churn": {"ios": 5}}
    assert tables["start"]["virtio0-virtqueues"] == [1, 2, 0, 0]
    assert tables["churn"]["virtio0-virtqueues"] == [11, 2, 0, 0]
    assert linux.IRQS_SH in linux.job(1.0)


def test_disk_image_is_zeros_of_the_size(tmp_path):
    path = linux.disk_image(str(tmp_path), "d.img", 1 << 20)
    with open(path, "rb") as f:
        assert f.read() == bytes(1 << 20)
