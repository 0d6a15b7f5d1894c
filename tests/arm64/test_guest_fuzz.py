"""The guest-side fuzzer (kvmits.fuzz.guest) against each ITS under KVM: a seeded slice of
streams leaves the machine serving and delivering, and the check it runs after every stream
does catch a machine that stopped delivering or stopped for too long. The 10,000-stream runs
are `python -m kvmits.fuzz.guest` in the testbed (docs/fuzzing.md)."""

from __future__ import annotations

import pytest

from kvmits.fuzz import guest as gf
from kvmits.its import commands as cmd
from kvmits.lab.testbed_console import TestbedConsole

pytestmark = pytest.mark.arm64

STREAMS = 30


def test_a_seeded_slice_leaves_the_its_serving(arm64_kvm, its_kind):
    # two VMs (per_vm 15): the second starts from a seed of its own, as a reproduction would
    stats = gf.fuzz_its(its_kind, range(1000, 1000 + STREAMS), per_vm=15, bound=gf.DEFAULT_BOUND,
                        console=TestbedConsole())
    assert stats.failures == []
    assert stats.streams == STREAMS and stats.vms == 2 and stats.reinits == STREAMS
    assert stats.accesses > 5 * STREAMS and stats.commands > 0 and stats.resets < STREAMS // 3
    assert 0 < stats.access_max_s < gf.DEFAULT_BOUND
    if its_kind == "user":
        assert 0 < stats.stop_max_s < gf.DEFAULT_BOUND


def test_the_check_sees_an_lpi_that_is_not_delivered(arm64_kvm, its_kind):
    stats = gf.Stats(its_kind)
    runner = gf.StreamRunner(its_kind, stats, bound=gf.DEFAULT_BOUND)
    try:
        runner.check(seed=1)                                # a healthy machine passes
        # the check's LPI disabled in the property table (and the ITS told: INVALL): the MSI
        # translates but the LPI never reaches the guest
        runner.lab.gic.set_lpi_config(gf.CHECK_LPI, enabled=False)
        runner.lab.its.submit(cmd.encode_invall(gf.CHECK_ICID), cmd.encode_sync(1))
        with pytest.raises(gf.StreamFailure, match="did not reach the guest"):
            runner.check(seed=1)
    finally:
        runner.close()


def test_a_stop_over_the_bound_fails_the_stream(arm64_kvm, its_kind):
    stats = gf.fuzz_its(its_kind, range(7, 9), per_vm=10, bound=0.0, console=TestbedConsole())
    assert [f["seed"] for f in stats.failures] == [7, 8]
    assert all("bound 0.0 s" in f["what"] for f in stats.failures)
