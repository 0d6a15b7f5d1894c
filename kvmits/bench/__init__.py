"""Measurements behind `kvmits bench` (kvmits/cli/bench.py): the two ITSes end to end, and the
Python MMIO exit loop against a C floor. Sits with the cli layer, above machine.

Every figure is a list of samples reduced by `spread()` to its median, min, max, p10 and p90;
`figure()` is the one shape the JSON output uses for a measured figure (see docs/bench.md).
"""

from __future__ import annotations

import statistics

#: bumped when the JSON output changes shape
SCHEMA_VERSION = 1

SPREAD_KEYS = ("median", "min", "max", "p10", "p90", "n")
FIGURE_KEYS = ("part", "name", "its", "path", "cpus", "unit", "better", "stats")
ITS_MODES = ("kernel", "user")


def _quantile(sorted_samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_samples) == 1:
        return sorted_samples[0]
    pos = q * (len(sorted_samples) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def spread(samples: list[float]) -> dict:
    """median, min, max, p10, p90 and the number of samples."""
    if not samples:
        raise ValueError("no samples")
    s = sorted(float(x) for x in samples)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1],
            "p10": _quantile(s, 0.10), "p90": _quantile(s, 0.90), "n": len(s)}


def figure(part: int, name: str, its: str | None, path: str, unit: str, better: str, samples: list[float],
           cpus: int | None = None, **extra) -> dict:
    """One measured figure: `its` is "kernel", "user" or None (not about an ITS); `path` says
    how (signal_msi, irqfd, python, c_floor...); `better` is "higher" or "lower"."""
    out = {"part": part, "name": name, "its": its, "path": path, "cpus": cpus, "unit": unit,
           "better": better, "stats": spread(samples)}
    out.update(extra)
    return out
