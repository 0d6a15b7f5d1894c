"""The shape of `kvmits bench --json` (docs/bench.md), checked by the tests and usable by
anyone consuming the output: `check(result)` raises ValueError naming the first thing wrong."""

from __future__ import annotations

from kvmits.bench import FIGURE_KEYS, GROWTH_CLASSES, ITS_MODES, SCHEMA_VERSION, SPREAD_KEYS

TOP_KEYS = {"kvmits_bench", "host", "quick", "repeat", "runs", "targets", "seconds"}
RUN_KEYS = {"where", "arch", "emulated", "figures", "skipped"}
TARGET_KEYS = {"name", "where", "measured", "op", "limit", "met", "cost"}
#: a run with part 6 has "curves" too (an addition: a result without it keeps the schema)
CURVE_KEYS = {"name", "its", "path", "size_of", "fixed", "unit", "points", "exponent", "tail_exponent", "ratio", "growth",
              "sizes",
              "where"}
#: what part 6's figures carry besides FIGURE_KEYS
SIZE_KEYS = ("size", "size_of")
WHERES = {"host", "native", "testbed"}
NAMES = {"msi_throughput": 1, "msi_latency": 1, "translate_only": 1, "gits_read": 2, "command_batch": 3,
         "exit_loop": 4, "linux_boot": 5, "blk_iops": 5, "blk_latency": 5, "irq_rate": 5, "affinity_moves": 5,
         "python_its_work": 5, "its_accesses": 5, "its_commands": 5, "vcpu_stops": 5, "python_translations": 5,
         "device_interrupts": 5,
         # part 6 (scale): curves, each figure at one size (its `size`, counting `size_of`)
         "scale_map": 6, "scale_commands": 6, "scale_batch": 6, "scale_translate": 6, "scale_memory": 6,
         "scale_vcpu_stop": 6, "scale_delivery": 6, "scale_routes_memory": 6, "lpi_stress": 6}


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_figure(f: dict) -> None:
    _need(isinstance(f, dict) and set(FIGURE_KEYS) <= set(f), f"figure without {set(FIGURE_KEYS) - set(f)}: {f}")
    _need(NAMES.get(f["name"]) == f["part"], f"figure {f['name']!r} with part {f['part']}")
    _need(f["its"] in (*ITS_MODES, None), f"figure its {f['its']!r}")
    _need(isinstance(f["path"], str) and isinstance(f["unit"], str), f"figure path/unit: {f}")
    _need(f["better"] in ("higher", "lower"), f"figure better {f['better']!r}")
    _need(f["cpus"] is None or isinstance(f["cpus"], int), f"figure cpus {f['cpus']!r}")
    s = f["stats"]
    _need(set(s) == set(SPREAD_KEYS), f"stats keys {sorted(s)}")
    _need(all(_number(s[k]) for k in SPREAD_KEYS) and isinstance(s["n"], int) and s["n"] >= 1, f"stats {s}")
    _need(s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"], f"stats out of order: {s}")
    if f["part"] == 6:
        _need(all(k in f for k in SIZE_KEYS) and _number(f["size"]) and f["size"] > 0
              and isinstance(f["size_of"], str), f"a part 6 figure without a positive size and size_of: {f}")


def check_run(run: dict) -> None:
    _need(isinstance(run, dict) and set(run) == RUN_KEYS, f"run keys {sorted(run)}")
    _need(run["where"] in WHERES, f"run where {run['where']!r}")
    _need(isinstance(run["emulated"], bool), "run emulated is not a bool")
    for f in run["figures"]:
        check_figure(f)
    for s in run["skipped"]:
        _need(isinstance(s.get("part"), int) and isinstance(s.get("reason"), str), f"skipped entry {s}")


def check(result: dict) -> None:
    _need(isinstance(result, dict) and set(result) in (TOP_KEYS, TOP_KEYS | {"curves"}),
          f"top-level keys {sorted(result)}")
    _need(result["kvmits_bench"] == SCHEMA_VERSION, f"schema version {result['kvmits_bench']}")
    _need(isinstance(result["quick"], bool) and isinstance(result["repeat"], int), "quick/repeat")
    _need(isinstance(result["runs"], list), "runs is not a list")
    for run in result["runs"]:
        check_run(run)
    for c in result.get("curves", []):
        _need(set(c) == CURVE_KEYS and c["growth"] in GROWTH_CLASSES and len(c["points"]) >= 2, f"curve {c}")
    for t in result["targets"]:
        _need(set(t) == TARGET_KEYS and t["op"] in ("<=", ">=") and isinstance(t["met"], bool), f"target {t}")


def modes_present(run: dict, name: str) -> set[str]:
    """The ITS modes a run has figure `name` for."""
    return {f["its"] for f in run["figures"] if f["name"] == name}
