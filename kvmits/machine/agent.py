"""The guest agent's host side: its mailbox device, and the API that drives a guest through it.

The agent (guests/agent/, built by `make -C guests`) is a small bare-metal arm64 program that
is the guest's hands: the host posts a request for one vCPU ("load 4 bytes at GICD + 0x4",
"write ICC_EOIR1_EL1", "PSCI CPU_ON"), that vCPU performs it as a real guest load, store or
system register access, and writes the result back. Interrupts the vCPU takes come back as
(cpu, intid, time) reports. The protocol is a page of MMIO registers at MAILBOX_BASE, with no
memory behind it, so every access exits to the VMM on the accessing vCPU's own thread: one page
serves every vCPU, and the bus tells the device which vCPU is asking.

    agent = machine.agent                    # AgentDevice, on the bus at MAILBOX_BASE
    agent.wait_online([0])                   # the boot CPU said HELLO
    agent.start_cpus(4)                      # PSCI CPU_ON for vCPUs 1..3, wait for their HELLO
    typer = agent.read(0, GICD_BASE + 0x4, 4)
    agent.irq_mode(2, IrqMode.COUNT, table_gpa, 64)
    irqs = agent.wait_irqs(1, intid=8192)    # [(cpu, 8192, t)]
    agent.system_off()

guests/include/mailbox.h is the one definition of the register layout and the codes;
guests/README.md describes them, and tests/machine/test_agent.py checks this module against it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from enum import IntEnum
from pathlib import Path

from kvmits.errors import KvmitsError

log = logging.getLogger(__name__)

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
LPI_BASE = 8192

#: the agent's default bound on one idle WFI: a lost kick costs at most this long
DEFAULT_IDLE_US = 10_000
#: how long a request may take by default (the testbed runs KVM under TCG: be generous)
DEFAULT_TIMEOUT = 10.0

_U64 = (1 << 64) - 1


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


_ADDRESSED_OPS = frozenset((Op.READ, Op.WRITE, Op.TIMED_READ))


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
    directory = Path(env) if env else Path(__file__).resolve().parents[2] / "guests" / "build"
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
            what += f": PSCI returned {_signed32(detail)}"
        super().__init__(f"agent on vCPU {cpu}: {_describe(op, args)} failed with {what}")


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
    """The VM stopped (AgentDevice.stop()) while a request or a wait was outstanding."""


def _signed32(v: int) -> int:
    v &= 0xFFFF_FFFF
    return v - (1 << 32) if v & 0x8000_0000 else v


def _signed64(v: int) -> int:
    return v - (1 << 64) if v & (1 << 63) else v


def _describe(op: int, args: tuple) -> str:
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


# -- requests -----------------------------------------------------------------------------------------
_QUEUED, _RUNNING, _DONE = 0, 1, 2


class Request:
    """One posted request. `wait()` returns its result or raises why there is none."""

    __slots__ = ("cpu", "op", "args", "_regs", "_state", "_value", "_error", "_slot")

    def __init__(self, slot: _Cpu, op: int, args: tuple):
        self.cpu = slot.index
        self.op = op
        self.args = args
        self._regs = args + (0,) * (4 - len(args))    # what ARG0..ARG3 read as
        self._state = _QUEUED
        self._value = 0
        self._error: BaseException | None = None
        self._slot = slot

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def wait(self, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        slot = self._slot
        with slot.cond:
            if not slot.cond.wait_for(lambda: self._state == _DONE, timeout):
                where = ("still queued: the vCPU never polled for it (not online? asleep and not kicked?)"
                         if self._state == _QUEUED else "taken by the guest, never answered")
                if self._state == _QUEUED:
                    slot.queue.remove(self)
                self._state = _DONE
                self._error = AgentTimeout(f"agent on vCPU {self.cpu}: {_describe(self.op, self.args)} "
                                           f"not completed within {timeout} s ({where})")
        if self._error is not None:
            raise self._error
        return self._value

    def __repr__(self) -> str:
        state = ("queued", "running", "done")[self._state]
        return f"Request(vCPU {self.cpu}, {_describe(self.op, self.args)}, {state})"


class _Cpu:
    """Per-vCPU state. `cond` guards the queue and the current request."""

    __slots__ = ("index", "cond", "queue", "current", "mpidr", "online", "version", "panic", "panic_regs",
                 "hello_time")

    def __init__(self, index: int):
        self.index = index
        self.cond = threading.Condition(threading.Lock())
        self.queue: deque[Request] = deque()
        self.current: Request | None = None
        self.mpidr: int | None = None
        self.online = False
        self.version: int | None = None
        self.panic: AgentPanic | None = None
        self.panic_regs = [0, 0, 0]                    # FAR, ELR, kind: written before MB_PANIC
        self.hello_time = 0.0


class AgentDevice:
    """The mailbox device (an MMIO bus device at MAILBOX_BASE) and the host API of the agent.

    `gicd_base`: what the agent reads at MB_GICD_BASE (0: it leaves the distributor alone);
    `gicr_base(cpu)`: vCPU `cpu`'s redistributor RD_base (None: 0 for all); `kick(cpu)`: make
    vCPU `cpu` leave KVM_RUN so an agent asleep in WFI polls again (the machine's signal);
    `idle_us`: the bound of one idle WFI; `on_panic(AgentPanic)`: called on the vCPU thread
    when an agent panics (e.g. to stop the VM).

    Guest-facing: mmio_read/mmio_write (from vCPU threads). Host-facing: everything else, from
    any thread. A mailbox access the protocol does not allow is logged once, counted in
    `bad_accesses`, and otherwise ignored (reads return 0): guest input never raises here.
    """

    def __init__(self, gicd_base: int, gicr_base: Callable[[int], int] | None = None,
                 kick: Callable[[int], None] | None = None, *, idle_us: int = DEFAULT_IDLE_US,
                 on_panic: Callable[[AgentPanic], None] | None = None,
                 describe_cpu: Callable[[int], str] | None = None):
        self.gicd_base = gicd_base
        self._gicr_base = gicr_base
        self._kick = kick
        #: what the VMM knows of a vCPU (its thread's state), added to a request's timeout
        self.describe_cpu = describe_cpu
        self.idle_us = idle_us
        self.on_panic = on_panic
        self._cpus: list[_Cpu] = []
        self._lock = threading.Lock()                   # growth of _cpus, the bad-access log
        #: guards _irqs, online state and panics; notified on each of them
        self._events = threading.Condition(threading.Lock())
        self._irqs: list[tuple[int, int, float]] = []
        self._panics: list[AgentPanic] = []
        self._stopped: BaseException | None = None
        self._bad_seen: set[tuple[int, int, bool]] = set()
        #: mailbox accesses the protocol does not allow (logged once per offset/size/direction)
        self.bad_accesses = 0

    # -- the guest side: the bus calls these on the accessing vCPU's thread ----------------------
    def mmio_read(self, vcpu: int, offset: int, size: int) -> int:
        if size == 8 and not offset & 7:
            if offset == MB_REQ:
                return self._next_request(vcpu)
            if MB_ARG0 <= offset <= MB_ARG3:
                try:
                    req = self._cpus[vcpu].current
                except IndexError:
                    req = None
                if req is not None:
                    return req._regs[(offset - MB_ARG0) >> 3]
            elif offset == MB_GICD_BASE:
                return self.gicd_base
            elif offset == MB_GICR_BASE:
                return self._gicr_base(vcpu) if self._gicr_base is not None else 0
            elif offset == MB_IDLE_US:
                return self.idle_us
        self._bad(vcpu, offset, size, False, 0)
        return 0

    def mmio_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        if offset == MB_IRQ and size == 4:
            with self._events:
                self._irqs.append((vcpu, value, time.monotonic()))
                self._events.notify_all()
            return
        if size == 8 and not offset & 7:
            if offset == MB_RESULT:
                if self._complete(vcpu, value, None):
                    return
            elif offset == MB_ERROR:
                if self._complete(vcpu, value, True):
                    return
            elif offset == MB_HELLO:
                self._hello(vcpu, value)
                return
            elif offset == MB_VERSION:
                self._slot(vcpu).version = value
                return
            elif MB_PANIC_FAR <= offset <= MB_PANIC_KIND:
                self._slot(vcpu).panic_regs[(offset - MB_PANIC_FAR) >> 3] = value
                return
            elif offset == MB_PANIC:
                self._panic(vcpu, value)
                return
        self._bad(vcpu, offset, size, True, value)

    def _slot(self, vcpu: int) -> _Cpu:
        try:
            return self._cpus[vcpu]
        except IndexError:
            pass
        if not 0 <= vcpu < 1 << 16:
            raise ValueError(f"vCPU index {vcpu} out of range")
        with self._lock:
            while len(self._cpus) <= vcpu:
                self._cpus.append(_Cpu(len(self._cpus)))
        return self._cpus[vcpu]

    def _next_request(self, vcpu: int) -> int:
        slot = self._slot(vcpu)
        if not slot.queue and slot.current is None:
            return Op.WAIT                  # the idle poll: no lock (a racing post() kicks)
        with slot.cond:
            dropped = slot.current
            if dropped is not None:
                # The agent polls again without answering: it lost the request (a guest bug).
                self._finish(slot, dropped, error=AgentProtocolError(
                    f"agent on vCPU {vcpu} took {_describe(dropped.op, dropped.args)} and asked for the "
                    f"next request without answering it"))
            if not slot.queue:
                return Op.WAIT
            req = slot.queue.popleft()
            req._state = _RUNNING
            slot.current = req
            return req.op

    def _finish(self, slot: _Cpu, req: Request, value: int = 0, error: BaseException | None = None) -> None:
        """With slot.cond held."""
        if slot.current is req:
            slot.current = None
        if req._state != _DONE:             # else: it timed out; the late answer is dropped
            req._value = value
            req._error = error
            req._state = _DONE
        slot.cond.notify_all()

    def _complete(self, vcpu: int, value: int, is_error: bool | None) -> bool:
        try:
            slot = self._cpus[vcpu]
        except IndexError:
            return False
        with slot.cond:
            req = slot.current
            if req is None:
                return False
            error = None
            if is_error:
                error = AgentRequestFailed(vcpu, req.op, req.args, value & 0xFF, value >> ERR_DETAIL_SHIFT)
            self._finish(slot, req, value, error)
        return True

    def _hello(self, vcpu: int, mpidr: int) -> None:
        slot = self._slot(vcpu)
        with self._events:
            slot.mpidr = mpidr
            slot.online = True
            slot.hello_time = time.monotonic()
            self._events.notify_all()
        if slot.version != AGENT_VERSION:
            log.error("agent on vCPU %d speaks mailbox protocol version %s, this host %d: rebuild the guest "
                      "programs (make -C guests)", vcpu, slot.version, AGENT_VERSION)
        log.debug("agent on vCPU %d online (MPIDR %#x)", vcpu, mpidr)

    def _panic(self, vcpu: int, value: int) -> None:
        slot = self._slot(vcpu)
        far, elr, kind = slot.panic_regs
        exc = AgentPanic(vcpu, kind, value, far, elr)
        log.error("%s", exc)
        with slot.cond:
            slot.panic = exc
            self._fail_pending(slot, exc)
        with self._events:
            self._panics.append(exc)
            self._events.notify_all()
        if self.on_panic is not None:
            try:
                self.on_panic(exc)
            except Exception:
                log.exception("on_panic callback failed")

    def _fail_pending(self, slot, error: BaseException) -> None:
        """Fail the current and every queued request of `slot` with `error` (slot.cond held)."""
        pending = list(slot.queue)
        slot.queue.clear()
        if slot.current is not None:
            pending.append(slot.current)
        for req in pending:
            self._finish(slot, req, error=error)

    def _bad(self, vcpu: int, offset: int, size: int, is_write: bool, value: int) -> None:
        key = (offset, size, is_write)
        with self._lock:
            self.bad_accesses += 1
            if key in self._bad_seen:
                return
            self._bad_seen.add(key)
        if is_write:
            log.warning("agent mailbox: vCPU %d wrote %#x with %d bytes at offset %#x: not a register of that "
                        "size, or no request in progress; ignored (logged once)", vcpu, value, size, offset)
        else:
            log.warning("agent mailbox: vCPU %d read %d bytes at offset %#x: not a register of that size, or "
                        "no request in progress; reads as 0 (logged once)", vcpu, size, offset)

    # -- the host side: requests -----------------------------------------------------------------------
    def post(self, cpu: int, op: int, *args: int) -> Request:
        """Queue a request for vCPU `cpu` and kick it; returns at once (Request.wait() for the result)."""
        if len(args) > 4:
            raise ValueError(f"a request has at most 4 arguments, not {len(args)}")
        regs = []
        for a in args:
            a = int(a)
            if not -(1 << 63) <= a <= _U64:
                raise ValueError(f"argument {a:#x} does not fit in 64 bits")
            regs.append(a & _U64)
        if op in _ADDRESSED_OPS and regs and MAILBOX_BASE <= regs[0] < MAILBOX_BASE + MAILBOX_SIZE:
            # the agent would be reading its own requests (REQ takes the next one)
            raise ValueError(f"{_describe(op, tuple(regs))}: the address is in the agent's own mailbox")
        slot = self._slot(cpu)
        req = Request(slot, int(op), tuple(regs))
        with slot.cond:
            if self._stopped is not None:
                raise AgentStopped(f"the VM stopped ({self._stopped}): cannot send {_describe(op, req.args)}")
            if slot.panic is not None:
                raise slot.panic
            slot.queue.append(req)
        if self._kick is not None:
            self._kick(cpu)
        return req

    def call(self, cpu: int, op: int, *args: int, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Post a request to vCPU `cpu` and wait for its result (AgentTimeout, AgentRequestFailed,
        AgentPanic, AgentStopped otherwise)."""
        try:
            return self.post(cpu, op, *args).wait(timeout)
        except AgentTimeout as exc:
            if self.describe_cpu is not None:
                exc.add_note(f"vCPU {cpu} at the timeout: {self.describe_cpu(cpu)}")
            raise

    def client(self, cpu: int) -> AgentClient:
        """Loads and stores performed by vCPU `cpu` (kvmits.lab.guest_driver.GuestAccess)."""
        return AgentClient(self, cpu)

    def read(self, cpu: int, addr: int, width: int = 4, *, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """A `width`-byte load at guest-physical `addr`, performed by vCPU `cpu`."""
        _check_width(width)
        return self.call(cpu, Op.READ, addr, width, timeout=timeout)

    def write(self, cpu: int, addr: int, width: int, value: int, *,
              timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """A `width`-byte store of `value` at guest-physical `addr` by vCPU `cpu`, then DSB SY."""
        _check_width(width)
        self.call(cpu, Op.WRITE, addr, width, value & ((1 << (8 * width)) - 1), timeout=timeout)

    def read_sysreg(self, cpu: int, reg: SysReg, *, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        return self.call(cpu, Op.SYSREG_READ, reg, timeout=timeout)

    def write_sysreg(self, cpu: int, reg: SysReg, value: int, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.call(cpu, Op.SYSREG_WRITE, reg, value, timeout=timeout)

    def ping(self, cpu: int, value: int = 0, *, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        return self.call(cpu, Op.PING, value, timeout=timeout)

    def cpu_on(self, cpu: int, target_mpidr: int, *, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """PSCI CPU_ON of the CPU with affinity `target_mpidr`, issued by vCPU `cpu`; the PSCI
        return value (0 = SUCCESS, -4 = ALREADY_ON, ...; see PSCI_RETURN)."""
        return _signed64(self.call(cpu, Op.CPU_ON, target_mpidr, timeout=timeout))

    def start_cpus(self, cpus: int | Iterable[int], *, via: int = 0,
                   mpidr_of: Callable[[int], int] = kvm_default_mpidr,
                   timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Bring up vCPUs (an int n: 1..n-1) with CPU_ON from vCPU `via`, then wait for their HELLO."""
        targets = [c for c in (range(cpus) if isinstance(cpus, int) else cpus) if c != via]
        for c in targets:
            ret = self.cpu_on(via, mpidr_of(c), timeout=timeout)
            if ret != 0:
                raise AgentError(f"PSCI CPU_ON of vCPU {c} (MPIDR {mpidr_of(c):#x}) from vCPU {via} returned "
                                 f"{ret} ({PSCI_RETURN.get(ret, 'unknown')})")
        self.wait_online(targets, timeout)

    def system_off(self, cpu: int = 0) -> Request:
        """PSCI SYSTEM_OFF from vCPU `cpu`: the VM ends (the machine sees it); nothing to wait for."""
        return self.post(cpu, Op.SYSTEM_OFF)

    def irq_mode(self, cpu: int, mode: IrqMode, table: int = 0, counters: int = 0, *,
                 timeout: float | None = DEFAULT_TIMEOUT) -> IrqMode:
        """Switch vCPU `cpu`'s IRQ handler; COUNT needs `table` (4-byte aligned guest RAM, u32 per
        LPI from 8192) and the number of `counters`. Returns the previous mode."""
        return IrqMode(self.call(cpu, Op.IRQ_MODE, mode, table, counters, timeout=timeout))

    def timed_read(self, cpu: int, addr: int, width: int, count: int, *,
                   timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """CNTVCT ticks vCPU `cpu` takes for `count` back-to-back `width`-byte loads at `addr`
        (read_sysreg(cpu, SysReg.CNTFRQ_EL0) gives ticks per second)."""
        _check_width(width)
        if count < 1:
            raise ValueError("count must be at least 1")
        return self.call(cpu, Op.TIMED_READ, addr, width, count, timeout=timeout)

    # -- the host side: state, interrupts ----------------------------------------------------------
    def wait_online(self, cpus: int | Iterable[int], timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Until every vCPU in `cpus` (an int n: 0..n-1) said HELLO: it set up its GIC CPU
        interface and serves requests. AgentProtocolError if one runs another protocol version."""
        wanted = list(range(cpus) if isinstance(cpus, int) else cpus)
        slots = [self._slot(c) for c in wanted]
        with self._events:
            ok = self._events.wait_for(
                lambda: self._stopped is not None or any(s.panic for s in slots) or all(s.online for s in slots),
                timeout)
        for s in slots:
            if s.panic is not None:
                raise s.panic
        if self._stopped is not None and not all(s.online for s in slots):
            raise AgentStopped(f"the VM stopped ({self._stopped}) before every vCPU of {wanted} came online")
        if not ok:
            missing = [s.index for s in slots if not s.online]
            raise AgentTimeout(f"agent: no HELLO from vCPU(s) {missing} within {timeout} s")
        for s in slots:
            if s.version != AGENT_VERSION:
                raise AgentProtocolError(f"agent on vCPU {s.index} speaks mailbox protocol version {s.version}, "
                                         f"this host {AGENT_VERSION}: rebuild the guest programs (make -C guests)")

    def online(self) -> list[int]:
        """vCPUs that said HELLO."""
        return [s.index for s in self._cpus if s.online]

    def mpidr(self, cpu: int) -> int | None:
        """MPIDR_EL1 vCPU `cpu` reported in its HELLO (None before)."""
        return self._slot(cpu).mpidr

    @property
    def panics(self) -> list[AgentPanic]:
        with self._events:
            return list(self._panics)

    def check(self) -> None:
        """Raise the first agent panic, if any."""
        with self._events:
            if self._panics:
                raise self._panics[0]

    def take_irqs(self) -> list[tuple[int, int, float]]:
        """Every (cpu, intid, time.monotonic()) reported so far, oldest first; forgets them."""
        with self._events:
            irqs, self._irqs = self._irqs, []
        return irqs

    def wait_irqs(self, count: int = 1, timeout: float | None = DEFAULT_TIMEOUT, *, cpu: int | None = None,
                  intid: int | None = None) -> list[tuple[int, int, float]]:
        """Until at least `count` reports match (`cpu`, `intid`: None matches any); returns and
        forgets all matching reports, leaving the others. AgentTimeout (with `.irqs`, the matching
        ones seen) if fewer came in time; AgentPanic if an agent panicked meanwhile."""

        def match(r):
            return (cpu is None or r[0] == cpu) and (intid is None or r[1] == intid)

        def ready():
            return (self._panics or self._stopped is not None
                    or sum(1 for r in self._irqs if match(r)) >= count)

        with self._events:
            self._events.wait_for(ready, timeout)
            got = [r for r in self._irqs if match(r)]
            if len(got) >= count:
                self._irqs = [r for r in self._irqs if not match(r)]
                return got
            panics = list(self._panics)
        if panics:
            raise panics[0]
        if self._stopped is not None:
            raise AgentStopped(f"the VM stopped ({self._stopped}) while waiting for interrupt reports")
        what = ("" if cpu is None else f" on vCPU {cpu}") + ("" if intid is None else f" of INTID {intid}")
        err = AgentTimeout(f"agent: {len(got)} of {count} interrupt report(s){what} within {timeout} s: {got}")
        err.irqs = got
        raise err

    def stop(self, reason: BaseException | str = "stopped") -> None:
        """The VM ended: fail every outstanding request and wait now, and refuse new ones."""
        self._stopped = reason
        err = AgentStopped(f"the VM stopped ({reason})")
        for slot in list(self._cpus):
            with slot.cond:
                self._fail_pending(slot, err)
                slot.cond.notify_all()
        with self._events:
            self._events.notify_all()


class AgentClient:
    """The loads and stores of one vCPU through the agent: kvmits.lab.guest_driver.GuestAccess."""

    __slots__ = ("agent", "cpu", "timeout")

    def __init__(self, agent: AgentDevice, cpu: int, timeout: float | None = DEFAULT_TIMEOUT):
        self.agent = agent
        self.cpu = cpu
        self.timeout = timeout

    def read(self, addr: int, width: int) -> int:
        return self.agent.read(self.cpu, addr, width, timeout=self.timeout)

    def write(self, addr: int, width: int, value: int) -> None:
        self.agent.write(self.cpu, addr, width, value, timeout=self.timeout)

    def read_sysreg(self, reg: SysReg) -> int:
        return self.agent.read_sysreg(self.cpu, reg, timeout=self.timeout)

    def write_sysreg(self, reg: SysReg, value: int) -> None:
        self.agent.write_sysreg(self.cpu, reg, value, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"AgentClient(vCPU {self.cpu})"


def _check_width(width: int) -> None:
    if width not in (1, 2, 4, 8):
        raise ValueError(f"access width must be 1, 2, 4 or 8 bytes, not {width}")
