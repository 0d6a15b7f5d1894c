"""`kvmits demo`'s comparison and table, on made-up runs (the real thing runs in tests/arm64)."""

from kvmits.cli.demo import ROWS, compare_runs, format_table


def run(seen, scale=1.0, stops=None):
    out = {"seen": seen, "times": {key: scale * (i + 1) for i, (key, *_rest) in enumerate(ROWS)}}
    if stops is not None:
        out["stops"] = stops
    return out


def test_same_lpis_in_any_order():
    a = run([("irqfd", 1, 8192), ("signal_msi", 0, 8193)])
    b = run([("signal_msi", 0, 8193), ("irqfd", 1, 8192)])
    assert compare_runs(a, b)
    c = run([("signal_msi", 2, 8193), ("irqfd", 1, 8192)])       # same LPI, another vCPU
    assert not compare_runs(a, c)


def test_table_says_identical_or_different_and_emulated():
    a = run([("irqfd", 1, 8192)])
    table = format_table(a, run([("irqfd", 1, 8192)], 2.0, stops=7), emulated=True)
    assert "identical" in table and "EMULATED" in table and "x2.0" in table
    assert "vCPU stops by the userspace ITS" in table and table.splitlines()[-2].split()[-1] == "7"
    table = format_table(a, run([("irqfd", 2, 8192)]), emulated=False)
    assert "DIFFERENT" in table and "EMULATED" not in table
