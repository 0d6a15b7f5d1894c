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


# -- curves (part 6: how a cost grows with the work) ------------------------------------------------
#: the growth classes a curve is named by, from the exponent k of cost ~ size**k
GROWTH_CLASSES = ("flat", "sublinear", "linear", "superlinear")
FLAT_EXPONENT = 0.1         # k below this: flat
LINEAR_EXPONENT = (0.9, 1.15)   # k within this: linear; between flat and it: sublinear; above: worse


def growth(points: list[tuple[float, float]], better: str) -> dict:
    """How a figure's cost grows with its size, from (size, median) points of one curve.

    The cost is the median itself for a "lower is better" figure (a time, bytes) and its
    inverse for a "higher is better" one (a rate: the time per operation). `exponent` is the
    least-squares slope of log(cost) against log(size) over the whole curve; `tail_exponent`
    the slope between its two largest sizes, which names the class: how the cost grows where
    the work is largest (a fixed cost at the small sizes, amortised, would hide that growth
    from the whole-curve fit). `ratio` is the cost at the largest size over the cost at the
    smallest. The class: flat (k < 0.1), sublinear, linear (0.9 <= k <= 1.15) or superlinear."""
    import math

    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', not {better!r}")
    pts = sorted((float(s), float(v)) for s, v in points)
    if len(pts) < 2 or len({s for s, _ in pts}) < 2:
        raise ValueError("a curve needs two sizes or more")
    if any(s <= 0 or v <= 0 for s, v in pts):
        raise ValueError(f"sizes and values must be positive: {pts}")
    cost = [(s, v if better == "lower" else 1.0 / v) for s, v in pts]
    xs = [math.log(s) for s, _ in cost]
    ys = [math.log(c) for _, c in cost]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    last = [i for i in range(len(xs)) if xs[i] != xs[-1]][-1]      # the largest size below the largest
    tail = (ys[-1] - ys[last]) / (xs[-1] - xs[last])
    if tail < FLAT_EXPONENT:
        cls = "flat"
    elif tail < LINEAR_EXPONENT[0]:
        cls = "sublinear"
    elif tail <= LINEAR_EXPONENT[1]:
        cls = "linear"
    else:
        cls = "superlinear"
    return {"exponent": k, "tail_exponent": tail, "ratio": cost[-1][1] / cost[0][1], "growth": cls,
            "sizes": [s for s, _ in pts]}


def curves(figures: list[dict]) -> dict[tuple, list[dict]]:
    """Part 6's figures grouped into curves: (name, its, path, size_of, fixed) -> the figures
    along `size`, sorted. `size_of` names what the size counts (events, vcpus, devices...);
    `fixed` is what the curve holds constant (e.g. the vCPU count of an events curve)."""
    out: dict[tuple, list[dict]] = {}
    for f in figures:
        if "size" not in f:
            continue
        key = (f["name"], f["its"], f["path"], f["size_of"], f.get("fixed"))
        out.setdefault(key, []).append(f)
    for figs in out.values():
        figs.sort(key=lambda f: f["size"])
    return out
