"""`kvmits bench --quick --json` on arm64 KVM: the output has the schema of docs/bench.md and every
ITS figure for both modes (numbers are reported by the benchmark, never asserted)."""

import json
import subprocess
import sys

import pytest

from kvmits.bench.schema import check, modes_present

pytestmark = pytest.mark.arm64


def test_bench_quick_json(arm64_kvm):
    out = subprocess.run([sys.executable, "-m", "kvmits", "bench", "--quick", "--json", "--repeat", "2",
                          "--no-chart"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    check(result)
    (run,) = result["runs"]
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
