"""`kvmits bench --quick --json` on arm64 KVM: the output has the schema of docs/bench.md and every
ITS figure for both modes (numbers are reported by the benchmark, never asserted)."""

import json
import subprocess
import sys

import pytest

from kvmits.bench.schema import check, modes_present

pytestmark = pytest.mark.arm64


def bench_json(*args: str, timeout: float) -> tuple[dict, dict]:
    """`kvmits bench --quick --json --no-chart ARGS` here: the checked result and its one run."""
    out = subprocess.run([sys.executable, "-m", "kvmits", "bench", "--quick", "--json", "--no-chart", *args],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    check(result)
    (run,) = result["runs"]
    return result, run


def test_bench_quick_json(arm64_kvm):
    result, run = bench_json("--repeat", "2", timeout=300)
    assert run["arch"] == "aarch64" and run["where"] in ("native", "testbed")
    for name in ("msi_throughput", "msi_latency", "gits_read", "command_batch"):
        assert modes_present(run, name) == {"kernel", "user"}, name
    paths = {(f["its"], f["path"]) for f in run["figures"] if f["name"] == "msi_throughput"}
    assert paths == {("kernel", "signal_msi"), ("kernel", "irqfd"), ("user", "signal_msi"), ("user", "irqfd")}
    assert {f["cpus"] for f in run["figures"] if f["name"] == "command_batch"} == {1, 4}
    exit_paths = {f["path"] for f in run["figures"] if f["name"] == "exit_loop"}
    assert {"kvm", "python"} <= exit_paths
    assert "c_floor" in exit_paths or any(s.get("path") == "c_floor" for s in run["skipped"])
    assert {t["name"] for t in result["targets"]} >= {"userspace irqfd throughput / kernel irqfd",
                                                      "userspace signal_msi throughput / kernel KVM_SIGNAL_MSI"}


def test_bench_part_5_quick_json(arm64_kvm):
    """Part 5, the Linux workload: both ITSes, the schema, and what the trace counts (issue 14)."""
    from kvmits.lab.linux_guest import LinuxGuest

    if LinuxGuest.find() is None:
        pytest.skip(LinuxGuest.why_missing())
    _, run = bench_json("--parts", "5", timeout=900)
    assert not run["skipped"], run["skipped"]
    for name in ("linux_boot", "blk_iops", "affinity_moves", "its_commands", "python_its_work"):
        assert modes_present(run, name) == {"kernel", "user"}, name
    fig = {(f["name"], f["its"], f["path"]): f for f in run["figures"]}
    for its in ("kernel", "user"):
        for path in ("qd1", "qd16", "shared_qd16", "shared_qd16_churn"):
            f = fig[("blk_iops", its, path)]
            assert f["stats"]["min"] > 0 and f["errors"] == 0 and f["lost"] == 0, f
        assert fig[("affinity_moves", its, "churn")]["move_failures"] == 0
    # the userspace ITS: Linux mapped its devices at boot, moved the shared vector by MOVI during
    # the churn, and no MSI of the I/O was translated in Python
    assert fig[("its_commands", "user", "boot")]["by_type"]["MAPD"] >= 2
    assert fig[("its_commands", "user", "io")]["by_type"].get("MOVI", 0) >= 1
    assert fig[("python_its_work", "user", "per_io")]["stats"]["max"] == 0
    assert fig[("python_translations", "user", "io")]["stats"]["max"] == 0


def test_bench_part_6_quick_json(arm64_kvm):
    """Part 6, scale (issue 18): every curve for both ITSes at two sizes or more, each with its
    growth named, and the targets computed from them."""
    result, run = bench_json("--parts", "6", "--repeat", "1", timeout=900)
    assert not run["skipped"], run["skipped"]
    for name in ("scale_batch", "scale_commands", "scale_delivery", "scale_routes_memory", "lpi_stress"):
        assert modes_present(run, name) == {"kernel", "user"}, name
    assert modes_present(run, "scale_vcpu_stop") == {"user"}          # the kernel's ITS stops nobody
    curves = {(c["name"], c["its"], c["path"], c["size_of"]) for c in result["curves"]}
    for its in ("kernel", "user"):
        assert {("scale_delivery", its, "irqfd", "events"), ("scale_delivery", its, "signal_msi", "events"),
                ("scale_batch", its, "movi_int_sync", "vcpus"), ("lpi_stress", its, "irqfd", "vcpus")} <= curves
    assert ("scale_translate", "user", "model", "events") in curves
    assert all(c["growth"] in ("flat", "sublinear", "linear", "superlinear") for c in result["curves"])
    names = {t["name"] for t in result["targets"]}
    assert "vCPU stop per batch against vCPUs (growth exponent at the most vCPUs)" in names
    assert "userspace irqfd LPI throughput / kernel's, at every size (the lowest)" in names
    assert any(n.startswith("model translation rate") for n in names)
