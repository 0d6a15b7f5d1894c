"""`kvmits bench`: the JSON schema of its output on this host (a quick run: the exit loop on the
host's KVM when there is one), the spread, targets and table on made-up figures. Numbers are
never checked here: the targets are reported by the benchmark, not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmits.bench import figure, spread
from kvmits.bench.schema import check, modes_present
from kvmits.cli.bench import format_table, targets, write_chart

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


def test_spread_orders_and_counts():
    s = spread([5, 1, 4, 2, 3])
    assert s == {"median": 3, "min": 1, "max": 5, "p10": 1.4, "p90": 4.6, "n": 5}
    assert spread([7.0])["p10"] == spread([7.0])["p90"] == 7.0
    with pytest.raises(ValueError):
        spread([])


def _run(where="testbed", emulated=True, user_irqfd=950.0, floor=100.0, python=40.0):
    f = [figure(1, "msi_throughput", "kernel", "irqfd", "MSIs/s", "higher", [1000.0], cpus=4),
         figure(1, "msi_throughput", "user", "irqfd", "MSIs/s", "higher", [user_irqfd], cpus=4),
         figure(1, "msi_throughput", "kernel", "signal_msi", "MSIs/s", "higher", [1000.0], cpus=4),
         figure(1, "msi_throughput", "user", "signal_msi", "MSIs/s", "higher", [200.0], cpus=4),
         figure(1, "translate_only", "user", "python", "us", "lower", [3.0], cpus=4),
         figure(3, "command_batch", "user", "mapti_int_sync", "ms", "lower", [2.0, 3.0], cpus=1,
                vcpu_stops_per_batch=1.0),
         figure(4, "exit_loop", None, "c_floor", "exits/s", "higher", [floor]),
         figure(4, "exit_loop", None, "kvm", "exits/s", "higher", [python * 1.1]),
         figure(4, "exit_loop", None, "python", "exits/s", "higher", [python])]
    return {"where": where, "arch": "aarch64", "emulated": emulated, "figures": f,
            "skipped": [{"part": 4, "path": "c_floor", "reason": "why"}]}


def _result(*runs):
    return {"kvmits_bench": 1, "host": "x86_64", "quick": True, "repeat": 1, "runs": list(runs),
            "targets": [t for r in runs for t in targets(r)], "seconds": 1.0}


def test_targets_met_and_missed_with_the_dominant_cost():
    by_name = {t["name"]: t for t in targets(_run())}
    assert by_name["userspace irqfd throughput / kernel irqfd"]["met"] is True
    slow = by_name["userspace signal_msi throughput / kernel KVM_SIGNAL_MSI"]
    assert slow["met"] is False and slow["measured"] == pytest.approx(0.2) and "translation alone" in slow["cost"]
    loop = by_name["Python exit loop cost / C floor"]
    assert loop["limit"] == 2.0 and loop["measured"] == pytest.approx(2.5) and loop["met"] is False
    assert "runner thread" in loop["cost"]
    assert {t["limit"] for t in targets(_run("host", False)) if t["name"].startswith("Python")} == {1.5}


def test_schema_accepts_the_result_and_rejects_damage():
    result = _result(_run())
    check(json.loads(json.dumps(result)))
    assert modes_present(result["runs"][0], "msi_throughput") == {"kernel", "user"}
    bad = json.loads(json.dumps(result))
    bad["runs"][0]["figures"][0]["stats"]["min"] = 1e9
    with pytest.raises(ValueError, match="out of order"):
        check(bad)
    bad = json.loads(json.dumps(result))
    del bad["runs"][0]["emulated"]
    with pytest.raises(ValueError, match="run keys"):
        check(bad)


def test_table_labels_emulated_runs_and_targets():
    table = format_table(_result(_run(), _run("host", False)))
    assert "EMULATED" in table.split("== host")[0] and "EMULATED" not in table.split("== host")[1]
    assert "MISSED" in table and "met" in table and "vCPU stops per batch: 1.00" in table


def test_chart_or_a_message_without_matplotlib(tmp_path):
    out = write_chart(_result(_run()), tmp_path / "c.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out.startswith("no chart: matplotlib is not installed")
    else:
        assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_quick_json_on_this_host(tmp_path):
    """The real command, on this host only (no testbed): the exit loop where there is KVM."""
    out = subprocess.run([sys.executable, "-m", "kvmits", "bench", "--quick", "--json", "--host-only",
                          "--repeat", "2", "--no-chart"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    result = json.loads(out.stdout)
    check(result)
    assert result["quick"] is True and result["repeat"] == 2
    if not HAVE_KVM:
        assert out.returncode == 1 and result["runs"][0]["skipped"]
        return
    assert out.returncode == 0, out.stderr
    (run,) = result["runs"]
    paths = {f["path"] for f in run["figures"] if f["name"] == "exit_loop"}
    assert {"kvm", "python"} <= paths
    assert "c_floor" in paths or any(s.get("path") == "c_floor" for s in run["skipped"])
    assert all(f["stats"]["n"] == 2 for f in run["figures"])


# -- part 5: the Linux workload (issue 14) ---------------------------------------------------------------
PART5 = Path(__file__).resolve().parent / "data" / "bench-part5-quick.json"


def _part5():
    """A real `kvmits bench --parts 5 --quick --json` of the testbed (6.1), as recorded."""
    return json.loads(PART5.read_text())


def test_a_part_5_result_has_the_schema_and_every_figure_for_both_itses():
    result = _part5()
    check(result)
    (run,) = result["runs"]
    for name in ("linux_boot", "blk_iops", "blk_latency", "irq_rate", "affinity_moves", "python_its_work",
                 "its_accesses", "its_commands", "vcpu_stops", "python_translations", "device_interrupts"):
        assert modes_present(run, name) == {"kernel", "user"}, name
    bad = _part5()
    bad["runs"][0]["figures"][0]["part"] = 4
    with pytest.raises(ValueError, match="linux_boot"):
        check(bad)


def test_part_5_targets_are_computed_from_the_figures():
    run = _part5()["runs"][0]
    by_name = {t["name"]: t for t in targets(run)}
    boot = by_name["Linux boot to userspace, userspace ITS / kernel ITS"]
    k = next(f for f in run["figures"] if (f["name"], f["its"], f["path"]) == ("linux_boot", "kernel", "userspace"))
    u = next(f for f in run["figures"] if (f["name"], f["its"], f["path"]) == ("linux_boot", "user", "userspace"))
    assert boot["measured"] == pytest.approx(u["stats"]["median"] / k["stats"]["median"])
    assert boot["met"] == (boot["measured"] <= 1.1) and "vCPU stops" in boot["cost"]
    assert {"virtio-blk IOPS at QD1, userspace ITS / kernel ITS", "virtio-blk IOPS at QD16, userspace ITS / kernel ITS",
            "Python translations per I/O, userspace ITS"} <= set(by_name)
    work = by_name["Python translations per I/O, userspace ITS"]
    assert (work["op"], work["limit"]) == ("<=", 0.0)
    # a run where the model translated in Python during the I/O misses it
    for f in run["figures"]:
        if (f["name"], f["its"]) == ("python_its_work", "user"):
            f["stats"] = {"median": 0.5, "min": 0.5, "max": 0.5, "p10": 0.5, "p90": 0.5, "n": 1}
    assert {t["name"]: t for t in targets(run)}["Python translations per I/O, userspace ITS"]["met"] is False


def test_demo_linux_table_from_part_5_figures():
    from kvmits.cli.demo import format_linux_table

    figures = _part5()["runs"][0]["figures"]
    table = format_linux_table(figures, emulated=True)
    assert "Linux boot to /init (s)" in table and "EMULATED" in table
    row = next(line for line in table.splitlines() if line.startswith("ITS commands at boot"))
    assert row.split()[-1] == "32" and "in KVM" in row
    assert "4 KiB random reads, QD16 (IOPS)" in table and " x" in table
