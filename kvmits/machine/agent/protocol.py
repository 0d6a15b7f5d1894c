"""The guest agent's mailbox protocol, as guests/include/mailbox.h defines it (the one definition;
tests/machine/test_agent.py checks this module against the header), and the errors a request
can end with.

The agent (guests/agent/, built by `make -C guests`) is a small bare-metal arm64 program that is
the guest's hands: the host posts a request for one vCPU ("load 4 bytes at GICD + 0x4", "write
ICC_EOIR1_EL1", "PSCI CPU_ON"), that vCPU performs it as a real guest load, store or system
register access, and writes the result back. The protocol is a page of MMIO registers at
MAILBOX_BASE, with no memory behind it, so every access exits to the VMM on the accessing vCPU's
own thread: one page serves every vCPU. The device that serves it is
kvmits.machine.devices.agent_mailbox; the host API that drives it is kvmits.machine.agent.host.
"""

from __future__ import annotations

import os
from enum import IntEnum
from pathlib import Path

from kvmits.errors import KvmitsError
from kvmits.its.registers import LPI_BASE  # noqa: F401 - mailbox.h has it too; the GIC's is the one definition

# -- the protocol (guests/include/mailbox.h) ---------------------------------------------------------
AGENT_VERSION = 1
MAILBOX_BASE = 0x0A00_0000
MAILBOX_SIZE = 0x1000

MB_REQ = 0x00
MB_ARG0 = 0x08
MB_ARG1 = 0x10
MB_ARG2 = 0x18
MB_ARG3 = 0x20
MB_RESULT = 0x40
MB_IRQ = 0x48
MB_HELLO = 0x50
MB_ERROR = 0x58
MB_GICD_BASE = 0x60
MB_GICR_BASE = 0x68
MB_PANIC = 0x70
MB_PANIC_FAR = 0x78
MB_PANIC_ELR = 0x80
MB_PANIC_KIND = 0x88
MB_IDLE_US = 0x90
MB_VERSION = 0x98

ERR_DETAIL_SHIFT = 8
PANIC_KIND_VECTOR_MAX = 15
PANIC_KIND_NO_SYSREG_GIC = 0x100
PANIC_KIND_BAD_CPU = 0x101

AGENT_MAX_CPUS = 64
AGENT_STACK_SHIFT = 13
AGENT_SECONDARY_CONTEXT = 0x5EC0DA7A
#: where the raw loader puts the agent (RAM base + 0x80000) and the first address it never
#: touches: its image, data, page table and stacks lie in [AGENT_LOAD_ADDR, AGENT_RAM_END)
AGENT_LOAD_ADDR = 0x4008_0000
AGENT_RAM_END = 0x4020_0000

#: the agent's default bound on one idle WFI: a lost kick costs at most this long
DEFAULT_IDLE_US = 10_000
#: vCPUs per DEFAULT_IDLE_US of the bound: every bounded WFI that ends is a mailbox poll, a
#: KVM_EXIT_MMIO into Python, so the bound grows with the vCPU count and the machine's idle
#: polls stay at 400/s at most (64 vCPUs at 10 ms each would poll 6400 times a second and take
#: the GIL from the vCPU doing the work)
IDLE_CPUS_PER_BOUND = 4

#: how long a request may take by default (the testbed runs KVM under TCG: be generous)
DEFAULT_TIMEOUT = 10.0


def idle_bound_us(cpus: int) -> int:
    """The bound of one idle WFI (MB_IDLE_US) on a machine of `cpus` vCPUs."""
    return DEFAULT_IDLE_US * max(1, -(-cpus // IDLE_CPUS_PER_BOUND))


U64_MASK = (1 << 64) - 1


class Op(IntEnum):
    """Request opcodes (MB_REQ)."""

    WAIT = 0
    READ = 1            # (addr, width 1/2/4/8) -> value
    WRITE = 2           # (addr, width, value) -> 0, then DSB SY
    SYSREG_READ = 3     # (SysReg) -> value
    SYSREG_WRITE = 4    # (SysReg, value) -> 0
    CPU_ON = 5          # (target MPIDR affinity) -> PSCI return value
    SYSTEM_OFF = 6      # () -> no result
    IRQ_MODE = 7        # (IrqMode, counter table GPA, number of counters) -> previous mode
    TIMED_READ = 8      # (addr, width, count) -> CNTVCT ticks for `count` loads
    PING = 9            # (value) -> value


ADDRESSED_OPS = frozenset((Op.READ, Op.WRITE, Op.TIMED_READ))


class SysReg(IntEnum):
    """System registers SYSREG_READ / SYSREG_WRITE reach (mailbox.h says which way)."""

    ICC_IAR1_EL1 = 1
    ICC_EOIR1_EL1 = 2
    ICC_HPPIR1_EL1 = 3
    ICC_RPR_EL1 = 4
    ICC_PMR_EL1 = 5
    ICC_BPR1_EL1 = 6
    ICC_CTLR_EL1 = 7
    ICC_SRE_EL1 = 8
    ICC_IGRPEN1_EL1 = 9
    ICC_DIR_EL1 = 10
    ICC_SGI1R_EL1 = 11
    ICC_AP1R0_EL1 = 12
    MPIDR_EL1 = 13
    CNTVCT_EL0 = 14
    CNTFRQ_EL0 = 15
    ID_AA64PFR0_EL1 = 16


class IrqMode(IntEnum):
    """What the agent's IRQ handler does with an interrupt it acknowledged."""

    REPORT = 0          # write the INTID to MB_IRQ: one exit per interrupt
    COUNT = 1           # LPIs: u32 counter at table + 4 * (intid - 8192) += 1, no exit
    MASKED = 2          # interrupts stay masked (PSTATE.I): the host acknowledges via SYSREG_READ


class ErrorCode(IntEnum):
    """MB_ERROR codes (bits [7:0]; the detail is above ERR_DETAIL_SHIFT)."""

    UNKNOWN_OP = 1      # detail: the opcode
    BAD_ARG = 2         # detail: index of the bad argument
    FAULT = 3           # detail: ESR_EL1 of the synchronous abort the access took
    PSCI = 4            # detail: what PSCI SYSTEM_OFF returned (it should not return)


PSCI_RETURN = {0: "SUCCESS", -1: "NOT_SUPPORTED", -2: "INVALID_PARAMETERS", -3: "DENIED",
               -4: "ALREADY_ON", -5: "ON_PENDING", -6: "INTERNAL_FAILURE", -7: "NOT_PRESENT",
               -8: "DISABLED", -9: "INVALID_ADDRESS"}

_VECTOR_NAMES = ("synchronous (EL1t)", "IRQ (EL1t)", "FIQ (EL1t)", "SError (EL1t)",
                 "synchronous (EL1h)", "IRQ (EL1h)", "FIQ (EL1h)", "SError (EL1h)",
                 "synchronous (lower EL, AArch64)", "IRQ (lower EL, AArch64)", "FIQ (lower EL, AArch64)",
                 "SError (lower EL, AArch64)", "synchronous (lower EL, AArch32)", "IRQ (lower EL, AArch32)",
                 "FIQ (lower EL, AArch32)", "SError (lower EL, AArch32)")
# ESR_ELx.EC values worth a name in an error message (Arm ARM D17.2.37)
_EC_NAMES = {0x00: "unknown reason (UNDEFINED instruction?)", 0x01: "WFI/WFE", 0x0E: "illegal execution state",
             0x15: "SVC", 0x16: "HVC", 0x17: "SMC", 0x18: "MSR/MRS trap", 0x20: "instruction abort, lower EL",
             0x21: "instruction abort", 0x22: "PC alignment", 0x24: "data abort, lower EL", 0x25: "data abort",
             0x26: "SP alignment", 0x2F: "SError", 0x3C: "BRK"}


def describe_esr(esr: int) -> str:
    ec = (esr >> 26) & 0x3F
    return f"ESR {esr:#x} (EC {ec:#x}: {_EC_NAMES.get(ec, 'see Arm ARM ESR_EL1')})"


def kvm_default_mpidr(index: int) -> int:
    """MPIDR_EL1 affinity of vCPU `index` as KVM sets it by default (arch/arm64/kvm/sys_regs.c,
    reset_mpidr): Aff0 = index[3:0], Aff1 = index[11:4], Aff2 = index[19:12]. The agent derives
    its CPU index (and stack) from MPIDR the same way; PSCI CPU_ON takes these affinity bits."""
    return (index & 0xF) | (((index >> 4) & 0xFF) << 8) | (((index >> 12) & 0xFF) << 16)


def guest_program(name: str = "agent") -> Path:
    """Path of a built guest program (guests/build/NAME.bin, or $KVMITS_GUEST_DIR/NAME.bin)."""
    env = os.environ.get("KVMITS_GUEST_DIR")
    directory = Path(env) if env else Path(__file__).resolve().parents[3] / "guests" / "build"
    path = directory / f"{name}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"guest program {path} not found: build the guest programs with `make -C guests`")
    return path


# -- errors -------------------------------------------------------------------------------------------
class AgentError(KvmitsError):
    """The agent did not do what was asked."""


class AgentTimeout(AgentError, TimeoutError):
    """A request, a HELLO or an interrupt report did not come in time."""


class AgentRequestFailed(AgentError):
    """The agent answered a request with MB_ERROR."""

    def __init__(self, cpu: int, op: int, args: tuple, code: int, detail: int):
        self.cpu, self.op, self.args, self.code, self.detail = cpu, op, args, code, detail
        try:
            what = ErrorCode(code).name
        except ValueError:
            what = f"error code {code}"
        if code == ErrorCode.FAULT:
            what += f": the access took a {describe_esr(detail)}"
        elif code == ErrorCode.BAD_ARG:
            what += f": argument {detail}"
        elif code == ErrorCode.PSCI:
            what += f": PSCI returned {signed32(detail)}"
        super().__init__(f"agent on vCPU {cpu}: {describe_request(op, args)} failed with {what}")


class AgentPanic(AgentError):
    """The agent took an exception it cannot handle (or found a fatal condition) and parked its CPU."""

    def __init__(self, cpu: int, kind: int, value: int, far: int, elr: int):
        self.cpu, self.kind, self.value, self.far, self.elr = cpu, kind, value, far, elr
        if kind <= PANIC_KIND_VECTOR_MAX:
            what = f"unexpected {_VECTOR_NAMES[kind]} exception, {describe_esr(value)}, FAR {far:#x}, ELR {elr:#x}"
        elif kind == PANIC_KIND_NO_SYSREG_GIC:
            what = (f"ICC_SRE_EL1.SRE stays 0 (ICC_SRE_EL1 = {value:#x}): no GICv3 system register interface "
                    f"(is the in-kernel vGICv3 created?)")
        elif kind == PANIC_KIND_BAD_CPU:
            what = f"MPIDR_EL1 {value:#x} gives a CPU index beyond the agent's {AGENT_MAX_CPUS} stacks"
        else:
            what = f"panic kind {kind:#x}, value {value:#x}, FAR {far:#x}, ELR {elr:#x}"
        super().__init__(f"agent on vCPU {cpu} panicked: {what}")


class AgentProtocolError(AgentError):
    """The agent broke the mailbox protocol (wrong version, a request dropped unanswered)."""


class AgentStopped(AgentError):
    """The VM stopped (AgentMailbox.stop()) while a request or a wait was outstanding."""


def signed32(v: int) -> int:
    v &= 0xFFFF_FFFF
    return v - (1 << 32) if v & 0x8000_0000 else v


def signed64(v: int) -> int:
    return v - (1 << 64) if v & (1 << 63) else v


def describe_request(op: int, args: tuple) -> str:
    """A request as an error message names it: OP(arg, ...), system registers by name."""
    try:
        name = Op(op).name
    except ValueError:
        name = f"op {op}"
    shown = [f"{a:#x}" for a in args]
    if op in (Op.SYSREG_READ, Op.SYSREG_WRITE) and args:
        try:
            shown[0] = SysReg(args[0]).name
        except ValueError:
            pass
    return f"{name}({', '.join(shown)})"


