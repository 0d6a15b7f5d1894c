"""kvmits.machine.state without KVM: the registers a state carries, and the checks a state
passes before anything is built. The real save/restore runs in the testbed
(tests/arm64/test_migration.py)."""

from __future__ import annotations

import copy

import pytest

from kvmits.gic.regs import GICD_CTLR, GICD_ICFGR, GICD_IPRIORITYR, GICD_IROUTER, GICD_ISPENDR
from kvmits.machine.its.interface import SAVED_REGISTERS, ItsStateError, parse_its_state
from kvmits.machine.state import CONFIG_FIELDS, MachineState, MachineStateError, check_state, dist_registers


def test_dist_registers_cover_the_spis_only_and_end_with_gicd_ctlr():
    regs = dict(dist_registers(128))
    assert len(regs) == len(dist_registers(128))                    # names unique
    offsets = list(regs.values())
    assert len(offsets) == len(set(offsets))
    # 96 SPIs: 3 words of 1-bit fields each (x4 kinds), 6 ICFGR words, 24 IPRIORITYR words, 96 IROUTERs x2
    assert len(regs) == 3 * 4 + 6 + 24 + 96 * 2 + 1
    assert regs["GICD_ISPENDR1"] == GICD_ISPENDR + 4 and "GICD_ISPENDR0" not in regs     # SGI/PPI: the redistributor's
    assert regs["GICD_ICFGR2"] == GICD_ICFGR + 8 and "GICD_ICFGR1" not in regs
    assert regs["GICD_IPRIORITYR8"] == GICD_IPRIORITYR + 32 and "GICD_IPRIORITYR31" in regs
    assert regs["GICD_IROUTER127.hi"] == GICD_IROUTER + 8 * 127 + 4
    names = [n for n, _ in dist_registers(128)]
    assert names[-1] == "GICD_CTLR" and regs["GICD_CTLR"] == GICD_CTLR
    # the pending bits after the configuration they qualify (edge/level)
    assert names.index("GICD_ICFGR2") < names.index("GICD_ISPENDR1")


def its_state(**regs):
    state = {"format": "kvmits-its", "version": 1, "kind": "kernel",
             "registers": {name: 0 for name, _ in SAVED_REGISTERS}}
    state["registers"].update(regs)
    return state


def test_its_state_registers_are_parsed_in_restore_order():
    names = [n for n, _ in SAVED_REGISTERS]
    assert names[0] == "GITS_IIDR" and names[-1] == "GITS_CTLR"
    assert names.index("GITS_CBASER") < names.index("GITS_CREADR")
    assert parse_its_state(its_state(GITS_CWRITER=0x40))["GITS_CWRITER"] == 0x40


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.update(format="x"), "not a 'kvmits-its' dict"),
    (lambda s: s.update(version=2), "version 2"),
    (lambda s: s.pop("registers"), "'registers' missing"),
    (lambda s: s["registers"].pop("GITS_BASER3"), "GITS_BASER3 must be a 64-bit integer, got None"),
    (lambda s: s["registers"].update(GITS_CTLR=True), "GITS_CTLR must be"),
    (lambda s: s["registers"].update(GITS_CBASER=1 << 64), "GITS_CBASER must be"),
])
def test_a_bad_its_state_is_refused_naming_what(mutate, message):
    state = its_state()
    mutate(state)
    with pytest.raises(ItsStateError, match=message):
        parse_its_state(state)


def machine_state(cpus=2, its="kernel", agent=False, rng=False):
    config = dict(cpus=cpus, mem_size=128 << 20, its=its, nr_irqs=128, agent=agent, translater_devid=0, disks=[],
                  rng=rng)
    assert set(config) == set(CONFIG_FIELDS)
    devices = {"pl011": {}, **({"agent": {}} if agent else {}), **({"pci": {"virtio-rng": {}}} if rng else {})}
    return MachineState({"format": "kvmits-machine", "version": 1, "config": config, "mpidrs": [0, 1]},
                        {"vcpus": [{"regs": [[1, "00"]], "mp_state": 0}] * cpus,
                         "gic": {"dist": {}, "redist": [{}] * cpus, "cpu": [{}] * cpus, "line_levels": {}},
                         "its": None if its is None else its_state(), "devices": devices})


def test_a_well_formed_state_passes():
    check_state(machine_state())
    check_state(machine_state(its=None, agent=True))
    check_state(machine_state(rng=True))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.meta.update(format="other"), "not a 'kvmits-machine' state"),
    (lambda s: s.meta.update(version=9), "version 9, this kvmits reads 1"),
    (lambda s: s.meta["config"].pop("nr_irqs"), "config must have exactly"),
    (lambda s: s.sections.pop("gic"), r"sections \['gic'\] missing"),
    (lambda s: s.sections["vcpus"].pop(), "2 vCPUs configured, 1 saved"),
    (lambda s: s.sections["vcpus"].__setitem__(1, {"regs": [[1, 2]], "mp_state": 0}), "vCPU 1 is malformed"),
    (lambda s: s.sections["gic"]["redist"].pop(), "the vGIC section is malformed"),
    (lambda s: s.sections.update(its=None), "the ITS section does not match"),
    (lambda s: s.sections["devices"].update(agent={}), "the devices section does not match"),
    (lambda s: s.sections["devices"].update(pci={}), "the devices section does not match"),
    (lambda s: s.meta["config"].update(rng=True), "the devices section does not match"),
])
def test_a_malformed_state_is_refused_before_anything_is_built(mutate, message):
    state = copy.deepcopy(machine_state())
    mutate(state)
    with pytest.raises(MachineStateError, match=message):
        check_state(state)
