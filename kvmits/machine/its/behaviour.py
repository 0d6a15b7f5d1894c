"""What the running kernel's ITS does where KVM's ITS changed between kernels, asked of it.

kvmits.its.config.KVM_CHANGES lists the changes a guest can see, each an ItsConfig field. The
model must make the choice of the kernel it runs on, and a kernel's version does not always
tell (a developer's own build, a distribution's backports), so `probe()` asks: a scratch VM
with one vCPU and the in-kernel ITS, driven through its attributes the way the hidden ITS is
(HiddenIts), its tables in a writable scratch slot read back after KVM_DEV_ARM_ITS_SAVE_TABLES.
No vCPU runs. The answer is kept per kernel for the life of the process.

- mapc_unmap_checks_target: MAPC ICID 5 -> vCPU 0, then MAPC V=0 of ICID 5 with RDbase 1 (no
  such vCPU). Saved tables with collection 5 still mapped: the check is there (Linux 6.1).
- zero_freed_entries: an ITE and a second device are saved (their entries now non-zero in the
  scratch tables), then DISCARD and MAPD V=0: are the entries zero now?
"""

from __future__ import annotations

import logging
import os
import struct
from typing import NamedTuple

from kvmits.gic.regs import GICR_PENDBASER, GICR_PROPBASER
from kvmits.its import abi
from kvmits.its import commands as cmd
from kvmits.its.config import KVM_CHANGES, kernel_version, kvm_choices
from kvmits.its.registers import GITS_BASER, LPI_BASE
from kvmits.kvm import GuestMemory
from kvmits.machine.its.hidden import DT_OFFSET, ITT_OFFSET, HiddenIts, injector_msi

log = logging.getLogger(__name__)

# The scratch slot is laid out as HiddenIts lays out its private memory (device table, collection
# table, queue, the injector's ITT); the probe adds these, in the space HiddenIts leaves free:
PROP_OFFSET = 0x30000       # LPI property table: 2**16 - 8192 bytes
PEND_OFFSET = 0x40000       # vCPU 0's pending table: 2**16 / 8 bytes, 64 KiB aligned
SPARE_ITT_OFFSET = 0x50000  # the ITT of the device MAPD V=0 unmaps
ID_BITS = 16
SPARE_DEVID = 2             # HiddenIts's creator is 1, its injectors from 0x100
PROBE_ICID = 5
PROBE_EVENT = 100
GICR_BASER_ATTRS = (0b111 << 7) | (0b01 << 10)     # Inner WB RaWaWb, Inner Shareable


class KernelItsBehaviour(NamedTuple):
    release: str            # uname -r
    version: str            # uname -v
    #: the KVM_CHANGES fields, as the probe found them
    choices: dict
    #: what KVM_CHANGES says for this kernel's version (None if the version cannot be read)
    expected: dict | None

    def differences(self) -> list[str]:
        """The choices where the kernel differs from what its version says."""
        if self.expected is None:
            return []
        return [f"{k}: probed {v}, expected {self.expected[k]} for {self.release}"
                for k, v in self.choices.items() if self.expected.get(k) != v]


_CACHE: dict[tuple[str, str], KernelItsBehaviour] = {}


def behaviour(kvm=None) -> KernelItsBehaviour:
    """The running kernel's ITS choices: probed once per process and kernel."""
    uname = os.uname()
    key = (uname.release, uname.version)
    if key not in _CACHE:
        _CACHE[key] = probe(kvm)
    return _CACHE[key]


def its_config(kvm=None, **overrides):
    """An ItsConfig making the running kernel's choices (and `overrides`)."""
    from kvmits.its import ItsConfig

    return ItsConfig(**{**behaviour(kvm).choices, **overrides})


def probe(kvm=None) -> KernelItsBehaviour:
    """Ask the running kernel (needs arm64 KVM; KvmError if a step fails)."""
    from kvmits.machine.machine import Machine, MachineConfig   # this module is below machine

    uname = os.uname()
    try:
        expected = kvm_choices(kernel_version(uname.version if "Debian" in uname.version else uname.release))
    except ValueError:
        expected = None
    machine = Machine(MachineConfig(cpus=1, mem_size=16 << 20, its="kernel"), kvm=kvm)
    scratch = None
    try:
        mm = machine.memmap
        scratch = GuestMemory(mm.hidden_its_private.base, mm.hidden_its_private.size)
        machine.vm.add_memory(scratch)
        base = scratch.gpa
        mpidr = machine.mpidrs[0]
        machine.gic.set_redist_reg64(mpidr, GICR_PROPBASER, base + PROP_OFFSET | GICR_BASER_ATTRS | (ID_BITS - 1))
        machine.gic.set_redist_reg64(mpidr, GICR_PENDBASER, base + PEND_OFFSET | GICR_BASER_ATTRS)
        its = machine.its.device
        engine = HiddenIts(machine.vm, its, scratch, 1)
        engine.program()
        choices = {}

        engine.run(cmd.encode_mapc(PROBE_ICID, 0), cmd.encode_mapc(PROBE_ICID, 1, valid=False))
        content = _saved(its, scratch)
        choices["mapc_unmap_checks_target"] = PROBE_ICID in content.dump["collections"]

        ite = base + ITT_OFFSET + PROBE_EVENT * abi.ABI_REV0_ENTRY_SIZE
        dte = base + DT_OFFSET + SPARE_DEVID * abi.ABI_REV0_ENTRY_SIZE
        engine.run(cmd.encode_mapti(*injector_msi(LPI_BASE + PROBE_EVENT), LPI_BASE + PROBE_EVENT, 0),
                   cmd.encode_mapd(SPARE_DEVID, base + SPARE_ITT_OFFSET, 1))
        _saved(its, scratch)
        if not (_u64(scratch, ite) and _u64(scratch, dte)):
            raise RuntimeError(f"ITS probe: KVM_DEV_ARM_ITS_SAVE_TABLES did not write the probe's ITE "
                               f"({_u64(scratch, ite):#x}) and DTE ({_u64(scratch, dte):#x})")
        engine.run(cmd.encode_discard(*injector_msi(LPI_BASE + PROBE_EVENT)),
                   cmd.encode_mapd(SPARE_DEVID, 0, 1, valid=False))
        zero_ite, zero_dte = _u64(scratch, ite) == 0, _u64(scratch, dte) == 0
        if zero_ite != zero_dte:
            # one kernel change did both; a kernel with one only is new to kvmits: say so
            log.warning("ITS probe: DISCARD %s the ITE but MAPD V=0 %s the DTE; the model zeroes both or neither",
                        "zeroes" if zero_ite else "keeps", "zeroes" if zero_dte else "keeps")
        choices["zero_freed_entries"] = zero_ite and zero_dte
    finally:
        machine.close()
        if scratch is not None:
            scratch.close()
    missing = {c.field for c in KVM_CHANGES} - set(choices)
    assert not missing, f"the ITS probe does not ask about {missing}"
    found = KernelItsBehaviour(uname.release, uname.version, choices, expected)
    for line in found.differences():
        log.warning("ITS probe: %s", line)
    return found


def _saved(its, mem) -> abi.TablesContent:
    its.save_tables()
    return abi.read_tables(mem, its.get_reg(GITS_BASER(0)), its.get_reg(GITS_BASER(1)), nr_vcpus=1)


def _u64(mem, gpa: int) -> int:
    return struct.unpack("<Q", mem.read(gpa, 8))[0]
