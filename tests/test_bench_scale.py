"""Part 6 of `kvmits bench` (scale) on made-up curves: growth classes, the issue-18 targets, the
schema's size fields and curves, the table and the chart. Numbers are never checked against
speed here: the targets are reported by the benchmark, not asserted."""

from __future__ import annotations

import pytest

from kvmits.bench import curves, figure, growth
from kvmits.bench.schema import check, check_figure
from kvmits.cli.bench import curve_growth, format_table, targets, write_chart


def test_growth_names_flat_sublinear_linear_and_worse():
    assert growth([(10, 5.0), (1e3, 5.1), (1e5, 5.2)], "lower")["growth"] == "flat"
    assert growth([(1, 1.0), (100, 10.0)], "lower")["growth"] == "sublinear"
    lin = growth([(1, 2.0), (4, 8.0), (64, 128.0)], "lower")
    assert lin["growth"] == "linear" and lin["exponent"] == pytest.approx(1.0) and lin["ratio"] == 64
    assert growth([(1, 1.0), (10, 100.0)], "lower")["growth"] == "superlinear"
    # a rate: the cost is its inverse, so a rate that halves per decade grows the cost
    rate = growth([(10, 1000.0), (100, 500.0), (1000, 250.0)], "higher")
    assert rate["ratio"] == pytest.approx(4.0) and rate["growth"] == "sublinear"
    # a fixed cost amortised at the small sizes hides the growth from the whole-curve fit: the
    # class comes from the last decade (the cost per mapped event on Linux 6.1, measured)
    u = growth([(10, 2031.0), (100, 134.0), (1000, 55.0), (1e4, 292.0), (1e5, 2847.0)], "lower")
    assert u["exponent"] < 0.1 and u["tail_exponent"] == pytest.approx(0.989, abs=0.01) and u["growth"] == "linear"
    with pytest.raises(ValueError):
        growth([(10, 1.0)], "lower")
    with pytest.raises(ValueError):
        growth([(10, 1.0), (10, 2.0)], "lower")
    with pytest.raises(ValueError):
        growth([(0, 1.0), (10, 2.0)], "lower")


def _f(name, its, path, unit, better, size, size_of, value, fixed):
    return figure(6, name, its, path, unit, better, [value], cpus=4, size=size, size_of=size_of, fixed=fixed)


def _scale_run(user_irqfd_at_1e5=950.0, stop64=64.0, model_rate_1e5=99_000.0):
    f = []
    for n, rate in ((10, 100_000.0), (1000, 100_000.0), (100_000, model_rate_1e5)):
        f.append(_f("scale_commands", "user", "model", "commands/s", "higher", n, "events", rate, None))
        f.append(_f("scale_translate", "user", "model", "us", "lower", n, "events", 2.0, None))
        f.append(_f("scale_delivery", "kernel", "irqfd", "MSIs/s", "higher", n, "events", 1000.0, "vcpus=4"))
        f.append(_f("scale_delivery", "user", "irqfd", "MSIs/s", "higher", n, "events",
                    user_irqfd_at_1e5 if n == 100_000 else 1000.0, "vcpus=4"))
    for cpus, ms in ((1, 1.0), (4, 4.0), (16, 16.0), (64, stop64)):
        f.append(_f("scale_vcpu_stop", "user", "pause", "ms", "lower", cpus, "vcpus", ms, "events=10"))
        for its in ("kernel", "user"):
            f.append(_f("lpi_stress", its, "irqfd", "LPIs/s", "higher", cpus, "vcpus", 3000.0, "devices=1"))
    return {"where": "testbed", "arch": "aarch64", "emulated": True, "figures": f, "skipped": []}


def _result(run):
    result = {"kvmits_bench": 1, "host": "x86_64", "quick": False, "repeat": 1, "runs": [run],
              "targets": targets(run), "seconds": 1.0}
    result["curves"] = [{**c, "where": run["where"]} for c in curve_growth(run)]
    return result


def test_curves_group_figures_by_what_they_hold_fixed():
    run = _scale_run()
    keys = set(curves(run["figures"]))
    assert ("scale_delivery", "user", "irqfd", "events", "vcpus=4") in keys
    assert ("lpi_stress", "kernel", "irqfd", "vcpus", "devices=1") in keys
    stress = curves(run["figures"])[("lpi_stress", "user", "irqfd", "vcpus", "devices=1")]
    assert [f["size"] for f in stress] == [1, 4, 16, 64]
    by = {(c["name"], c["its"], c["path"]): c for c in curve_growth(run)}
    assert by[("scale_vcpu_stop", "user", "pause")]["growth"] == "linear"
    assert by[("scale_translate", "user", "model")]["growth"] == "flat"
    assert by[("lpi_stress", "kernel", "irqfd")]["growth"] == "flat"


def test_scale_targets_met_on_good_curves_and_missed_on_bad_ones():
    good = {t["name"]: t for t in targets(_scale_run())}
    names = [n for n in good if "mapped events" in n]
    assert len(names) == 2 and all(good[n]["met"] for n in names)
    stop = good["vCPU stop per batch against vCPUs (growth exponent at the most vCPUs)"]
    assert stop["met"] and stop["measured"] == pytest.approx(1.0)
    irqfd = good["userspace irqfd LPI throughput / kernel's, at every size (the lowest)"]
    assert irqfd["met"] and irqfd["measured"] == pytest.approx(0.95)
    bad = {t["name"]: t for t in targets(_scale_run(user_irqfd_at_1e5=500.0, stop64=640.0,
                                                    model_rate_1e5=50_000.0))}
    assert not bad["vCPU stop per batch against vCPUs (growth exponent at the most vCPUs)"]["met"]
    low = bad["userspace irqfd LPI throughput / kernel's, at every size (the lowest)"]
    assert not low["met"] and low["measured"] == pytest.approx(0.5) and "100000 events" in low["cost"]
    model = [t for n, t in bad.items() if n.startswith("model command rate")]
    assert len(model) == 1 and not model[0]["met"] and model[0]["measured"] == pytest.approx(2.0)


def test_schema_takes_curves_and_wants_sizes_on_part_6_figures():
    result = _result(_scale_run())
    check(result)
    no_size = figure(6, "scale_batch", "user", "movi_int_sync", "ms", "lower", [1.0])
    with pytest.raises(ValueError, match="size"):
        check_figure(no_size)
    bad = _result(_scale_run())
    bad["curves"][0]["growth"] = "exponential"
    with pytest.raises(ValueError, match="curve"):
        check(bad)


def test_table_names_each_curve_and_chart_draws_them(tmp_path):
    result = _result(_scale_run())
    text = format_table(result)
    assert "Curves (part 6)" in text and "scale_vcpu_stop" in text and "linear" in text
    assert "Targets (issues 6, 14 and 18)" in text
    out = write_chart(result, tmp_path / "scale.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out.startswith("no chart")
    else:
        assert out.startswith("chart written") and (tmp_path / "scale.png").stat().st_size > 1000


def test_part_6_on_a_host_without_arm64_kvm_measures_the_model_and_says_what_it_left(tmp_path):
    import json
    import platform
    import subprocess
    import sys

    if platform.machine() == "aarch64":
        pytest.skip("an arm64 host measures part 6 whole (tests/arm64/test_bench.py)")
    out = subprocess.run([sys.executable, "-m", "kvmits", "bench", "--parts", "6", "--quick", "--host-only", "--json",
                          "--repeat", "1", "--no-chart"], capture_output=True, text=True, timeout=300, check=False,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    check(result)
    (run,) = result["runs"]
    assert run["where"] == "host"
    assert {f["name"] for f in run["figures"]} == {"scale_commands", "scale_batch", "scale_translate", "scale_memory"}
    assert [s["part"] for s in run["skipped"]] == [6] and "arm64 KVM" in run["skipped"][0]["reason"]
    assert {(c["name"], c["path"]) for c in result["curves"]} == {
        ("scale_commands", "model"), ("scale_batch", "model"), ("scale_translate", "model"),
        ("scale_memory", "model_state")}
    assert any(t["name"].startswith("model translation rate") for t in result["targets"])


def test_report_derives_targets_and_curves_of_a_saved_result_again(tmp_path):
    import json
    import subprocess
    import sys

    saved = _result(_scale_run())
    saved["targets"] = []                           # as an older version would have left them
    del saved["curves"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(saved))
    out = subprocess.run([sys.executable, "-m", "kvmits", "bench", "--report", str(path), "--json", "--no-chart"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    check(result)
    assert result["runs"] == saved["runs"]                    # the measurements, untouched
    assert {t["name"] for t in result["targets"]} == {t["name"] for t in targets(saved["runs"][0])}
    assert len(result["curves"]) == len(curve_growth(saved["runs"][0]))
    path.write_text("{}")
    bad = subprocess.run([sys.executable, "-m", "kvmits", "bench", "--report", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "--report" in bad.stderr
