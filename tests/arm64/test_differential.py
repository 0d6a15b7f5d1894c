"""The differential check: random (mostly valid) ITS command programs, run by the same guest on
the kernel's ITS and on the userspace ITS; the final mapping states must be identical.

KVMITS_DIFF_COUNT programs (default 200), seeds from KVMITS_DIFF_SEED (default 1). Both states
are read the same way: the tables saved into guest memory (the kernel's by
KVM_DEV_ARM_ITS_SAVE_TABLES, the model's by save_tables()) and decoded (ABI rev 0); orphaned
ITEs, which those tables cannot show, are compared by a probe (kvmits.lab.differential).
A failing seed reproduces with KVMITS_DIFF_SEED=<seed> KVMITS_DIFF_COUNT=1. A long run prints
its progress every PROGRESS_EVERY programs (run pytest with -s to see it as it comes).
"""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.arm64

COUNT = int(os.environ.get("KVMITS_DIFF_COUNT", "200"))
FIRST_SEED = int(os.environ.get("KVMITS_DIFF_SEED", "1"))
CPUS = 4
#: a progress line every this many programs
PROGRESS_EVERY = 100


@pytest.fixture(scope="module")
def labs(arm64_kvm):
    from kvmits.lab.its_lab import ItsLab

    with ItsLab(cpus=CPUS, its="kernel") as kernel, ItsLab(cpus=CPUS, its="user") as user:
        kernel.setup()
        user.setup()
        yield kernel, user


#: the pending-state differences of the programs test_the_two_itses_end_in_the_same_state ran,
#: by seed, for test_the_two_itses_leave_the_same_lpis_pending
PENDING_DIFFERENCES: dict[int, list[str]] = {}
COMPARED: list[int] = []             # the program count, once that test has run them all


def test_the_two_itses_end_in_the_same_state(labs):
    from kvmits.lab.differential import compare, compare_pending, run_pair

    kernel, user = labs
    failures = {}
    commands = orphans = pending = 0
    start = time.monotonic()
    PENDING_DIFFERENCES.clear()
    for seed in range(FIRST_SEED, FIRST_SEED + COUNT):
        a, b = run_pair(kernel, user, seed)
        commands += b.commands
        orphans += len(b.orphans)
        pending += len(a.pending)
        diffs = compare(a.dump, b.dump, b.orphans)
        if diffs:
            failures[seed] = diffs
        pending_diffs = compare_pending(a.pending, b.pending)
        if pending_diffs:
            PENDING_DIFFERENCES[seed] = pending_diffs
        done = seed - FIRST_SEED + 1
        if done % PROGRESS_EVERY == 0 and done < COUNT:
            # a long run (KVMITS_DIFF_COUNT=1000) that a time limit stops still says how far it got
            print(f"\ndifferential: {done} of {COUNT} programs, {len(failures)} with mapping differences, "
                  f"{len(PENDING_DIFFERENCES)} with pending differences, {time.monotonic() - start:.0f} s", flush=True)
    print(f"differential: {COUNT} programs from seed {FIRST_SEED}, {commands} commands, {orphans} orphaned "
          f"ITEs probed, {pending} LPIs pending at the end (kernel), {len(failures)} with mapping differences, "
          f"{len(PENDING_DIFFERENCES)} with pending differences, {time.monotonic() - start:.0f} s")
    for seed, diffs in PENDING_DIFFERENCES.items():
        print(f"  pending, seed {seed}: " + "; ".join(diffs))
    COMPARED.append(COUNT)
    assert not failures, "\n".join(f"seed {s}: " + "; ".join(d[:5]) for s, d in list(failures.items())[:10])


def test_the_two_itses_leave_the_same_lpis_pending(labs):
    """The pending LPIs of the programs above, compared ((vCPU, INTID) after unmasking)."""
    if not COMPARED:
        pytest.skip("needs test_the_two_itses_end_in_the_same_state to have run the programs")
    assert not PENDING_DIFFERENCES, "\n".join(f"seed {s}: " + "; ".join(d) for s, d in PENDING_DIFFERENCES.items())


def test_the_check_sees_a_difference(labs):
    """The comparison is not blind: one extra mapping on one side is reported."""
    from kvmits.lab.differential import compare, run_program

    kernel, user = labs
    a = run_program(kernel, FIRST_SEED, probe=())
    user.its.mapd(0x77, 2)
    b = run_program(user, FIRST_SEED, probe=())
    assert compare(a.dump, b.dump) == []            # run_program resets first: the extra mapping went
    user.its.mapd(0x77, 2)
    diffs = compare(a.dump, user.its_state())
    assert diffs == ["device 0x77: kernel unmapped, user mapped"]


def test_an_orphaned_ite_behaves_the_same(labs):
    """MAPC V=0 of a collection an ITE names (UNPREDICTABLE): in both ITSes the ITE stays
    (a MAPTI of its EventID changes nothing, only MAPD frees it) and never translates again,
    not even once its ICID is mapped again; the saved tables hold an invalid entry for it
    (the kernel's vgic_its_save_ite writes 0 for an ITE without a collection)."""
    for lab in labs:
        lab.reset_its()
        dev = lab.its.mapd(3, 4)
        lab.its.mapti(3, 10, 8300, 2)
        lab.its.mapti(3, 11, 8301, 1)
        lab.its.mapti(3, 12, 8302, 2)
        assert lab.msi(3, 11) == 1
        lab.expect(cpu=1, intid=8301)
        lab.its.mapc(1, 1, valid=False)
        assert lab.msi(3, 11) == 0, lab.mode
        lab.its.mapc(1, 3)
        assert lab.msi(3, 11) == 0, lab.mode
        lab.its.mapti(3, 11, 8303, 1)                  # ignored: the orphan is still there
        assert lab.msi(3, 11) == 0, lab.mode
        time.sleep(0.2)                                # (the programs' INTs may still report)
        assert [r for r in lab.agent.take_irqs() if r[1] in (8301, 8303)] == [], lab.mode
        lab.machine.ram.write(dev.itt + 8 * 11, (0xDEAD << 16).to_bytes(8, "little"))
        content = lab.its_tables()
        assert content.dump["devices"][3]["events"] == {10: {"icid": 2, "intid": 8300},
                                                         12: {"icid": 2, "intid": 8302}}, lab.mode
        assert int.from_bytes(lab.machine.ram.read(dev.itt + 8 * 10, 8), "little") >> 48 == 1  # next: 11
        assert lab.machine.ram.read(dev.itt + 8 * 11, 8) == bytes(8), lab.mode
        lab.its.mapd(3, 4)                             # MAPD frees it: the EventID maps again
        lab.its.mapti(3, 11, 8303, 1)
        assert lab.msi(3, 11) == 1
        lab.expect(cpu=3, intid=8303)


def test_a_small_command_budget_changes_nothing_the_guest_sees(labs):
    """With a command budget of 2, the guest's GITS_CREADR polls run most of each batch: what
    they run must reach the hidden ITS at once (LPIs delivered) and end in the kernel's state."""
    from kvmits.its import commands as cmd
    from kvmits.lab.differential import compare, compare_pending, run_pair
    from kvmits.machine.its.behaviour import its_config
    from kvmits.lab.its_lab import ItsLab

    kernel, _ = labs
    # the running kernel's choices (kvmits.machine.its.behaviour), with a budget of 2
    with ItsLab(cpus=CPUS, its="user", its_config=its_config(command_budget=2)) as small:
        small.setup()
        for lab in (kernel, small):
            lab.reset_its()
            lab.its.mapd(2, 3)
            lab.its.submit(*(cmd.encode_mapti(2, ev, 8400 + ev, ev % CPUS) for ev in range(7)))
            for ev in range(7):
                assert lab.msi(2, ev) == 1, lab.mode
                lab.expect(cpu=ev % CPUS, intid=8400 + ev)
        for seed in range(FIRST_SEED, FIRST_SEED + 5):
            a, b = run_pair(kernel, small, seed)
            assert compare(a.dump, b.dump, b.orphans) == [], seed
            assert compare_pending(a.pending, b.pending) == [], seed
