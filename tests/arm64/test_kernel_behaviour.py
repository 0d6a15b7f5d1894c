"""Where KVM's ITS changed between kernels (kvmits.its.config.KVM_CHANGES): the probe asks the
running kernel, the userspace ITS makes the same choice, and a guest sees the same on both.

Run on every kernel of the matrix (tools/testbed --kernel ..., docs/kernels.md): on 6.1 and on
6.12 the choices differ, and these tests show each ITS following its kernel.
"""

from __future__ import annotations

import os
import struct

import pytest

from kvmits.its import commands as cmd
from kvmits.its.config import KVM_CHANGES
from kvmits.its.registers import GITS_BASER, GITS_BASER_ADDR_MASK, GITS_BASER_TYPE_DEVICE, LPI_BASE
from tests.arm64.conftest import LAB_CPUS

pytestmark = pytest.mark.arm64

DEVID = 0x23


def choices():
    from kvmits.machine.its import behaviour

    return behaviour.behaviour().choices


def test_the_probe_answers_every_change_and_matches_the_version(arm64_kvm):
    from kvmits.machine.its import behaviour

    found = behaviour.probe()
    print(f"\n{found.release} ({found.version}): probed {found.choices}, by version {found.expected}")
    assert set(found.choices) == {c.field for c in KVM_CHANGES}
    if "Debian" in found.version:
        # a Debian kernel is a release KVM_CHANGES can speak for; a developer's build may differ
        assert not found.differences()


def test_a_user_machine_makes_the_running_kernels_choices(lab):
    if lab.mode != "user":
        pytest.skip("the kernel's ITS has no configuration")
    config = lab.machine.its.model.config
    assert {k: getattr(config, k) for k in choices()} == choices()


def test_mapc_unmap_with_a_target_past_the_last_vcpu(lab):
    """Linux 6.1 refuses MAPC V=0 with RDbase past the last vCPU (the collection stays); since
    6.7 it unmaps the collection."""
    lab.reset_its()
    lab.its.mapc(5, 2)
    lab.its.submit(cmd.encode_mapc(5, LAB_CPUS, valid=False), cmd.encode_sync(0))
    still_mapped = lab.its_state()["collections"].get(5) == 2
    print(f"\n{os.uname().release}, its={lab.mode}: collection 5 after MAPC V=0 RDbase={LAB_CPUS}: "
          f"{'mapped' if still_mapped else 'unmapped'}")
    assert still_mapped == choices()["mapc_unmap_checks_target"]


def test_discard_and_mapd_unmap_zero_the_freed_entries(lab):
    """Linux 6.13 (backported to 6.1.120+ and 6.12.y): DISCARD zeroes the ITE in the ITT, MAPD
    V=0 the device table entry. The entries are first written by a save of the tables."""
    lab.reset_its()
    dev = lab.its.mapd(DEVID, 2)
    lab.its.mapti(DEVID, 0, LPI_BASE + 40, 1)
    lab.its.mapti(DEVID, 1, LPI_BASE + 41, 1)
    lab.its_tables()                                   # SAVE_TABLES / save_tables(): entries written
    table = lab.its.tables[GITS_BASER_TYPE_DEVICE]
    dte = (lab.its.read_reg(GITS_BASER(table.index)) & GITS_BASER_ADDR_MASK) + DEVID * table.entry_size

    def u64(gpa):
        return struct.unpack("<Q", lab.machine.ram.read(gpa, 8))[0]

    assert u64(dev.itt) and u64(dev.itt + 8) and u64(dte)
    lab.its.discard(DEVID, 0)
    ite_zeroed, other_kept = u64(dev.itt) == 0, u64(dev.itt + 8) != 0
    lab.its.mapd(DEVID, 2, valid=False)
    dte_zeroed = u64(dte) == 0
    print(f"\n{os.uname().release}, its={lab.mode}: DISCARD zeroed the ITE: {ite_zeroed}, "
          f"MAPD V=0 zeroed the DTE: {dte_zeroed}")
    assert other_kept
    assert ite_zeroed == dte_zeroed == choices()["zero_freed_entries"]
