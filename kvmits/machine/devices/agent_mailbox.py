"""The guest agent's mailbox: the MMIO device through which the host drives a guest program.

The agent polls MB_REQ on each vCPU for the next request the host posted for that vCPU, reads
its arguments, performs it and writes MB_RESULT or MB_ERROR; it reports HELLO when a vCPU comes
online, every interrupt it takes (MB_IRQ), and a panic. This module is that device: the per-vCPU
request queues, the Request a host waits on, and the reports. The protocol is
kvmits.machine.agent.protocol; the typed host API over post() is kvmits.machine.agent.host.Agent.

Request lives here, with the queue that completes it, not with the host API: its state is
guarded by its vCPU's slot lock (_Cpu.cond), the vCPU thread completes it from mmio_write, and
a wait that times out withdraws it from that slot's queue. Only the device touches those.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from kvmits.machine.agent.protocol import (
    ADDRESSED_OPS, AGENT_VERSION, DEFAULT_IDLE_US, DEFAULT_TIMEOUT, ERR_DETAIL_SHIFT, MAILBOX_BASE, MAILBOX_SIZE,
    MB_ARG0, MB_ARG3, MB_ERROR, MB_GICD_BASE, MB_GICR_BASE, MB_HELLO, MB_IDLE_US, MB_IRQ, MB_PANIC, MB_PANIC_FAR,
    MB_PANIC_KIND, MB_REQ, MB_RESULT, MB_VERSION, U64_MASK, AgentPanic, AgentProtocolError, AgentRequestFailed,
    AgentStopped, AgentTimeout, Op, describe_request,
)

log = logging.getLogger(__name__)


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
                self._error = AgentTimeout(f"agent on vCPU {self.cpu}: {describe_request(self.op, self.args)} "
                                           f"not completed within {timeout} s ({where})")
        if self._error is not None:
            raise self._error
        return self._value

    def __repr__(self) -> str:
        state = ("queued", "running", "done")[self._state]
        return f"Request(vCPU {self.cpu}, {describe_request(self.op, self.args)}, {state})"


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


class AgentMailbox:
    """The mailbox device: an MMIO bus device at MAILBOX_BASE (kvmits.machine.agent.protocol).

    `gicd_base`: what the agent reads at MB_GICD_BASE (0: it leaves the distributor alone);
    `gicr_base(cpu)`: vCPU `cpu`'s redistributor RD_base (None: 0 for all); `kick(cpu)`: make
    vCPU `cpu` leave KVM_RUN so an agent asleep in WFI polls again (the machine's signal);
    `idle_us`: the bound of one idle WFI; `on_panic(AgentPanic)`: called on the vCPU thread
    when an agent panics (e.g. to stop the VM).

    Guest-facing: mmio_read/mmio_write (from vCPU threads). Host-facing, from any thread: post()
    a request, and the state the guest reports (HELLO, interrupts, panics) with the waits on it;
    stop() when the VM ends. The typed requests are kvmits.machine.agent.host.Agent's. A mailbox
    access the protocol does not allow is logged once, counted in `bad_accesses`, and otherwise
    ignored (reads return 0): guest input never raises here.
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
                    f"agent on vCPU {vcpu} took {describe_request(dropped.op, dropped.args)} and asked for the "
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

    def _fail_pending(self, slot: _Cpu, error: BaseException) -> None:
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

    # -- the host side: posting a request -----------------------------------------------------------------------
    def post(self, cpu: int, op: int, *args: int) -> Request:
        """Queue a request for vCPU `cpu` and kick it; returns at once (Request.wait() for the result)."""
        if len(args) > 4:
            raise ValueError(f"a request has at most 4 arguments, not {len(args)}")
        regs = []
        for a in args:
            a = int(a)
            if not -(1 << 63) <= a <= U64_MASK:
                raise ValueError(f"argument {a:#x} does not fit in 64 bits")
            regs.append(a & U64_MASK)
        if op in ADDRESSED_OPS and regs and MAILBOX_BASE <= regs[0] < MAILBOX_BASE + MAILBOX_SIZE:
            # the agent would be reading its own requests (REQ takes the next one)
            raise ValueError(f"{describe_request(op, tuple(regs))}: the address is in the agent's own mailbox")
        slot = self._slot(cpu)
        req = Request(slot, int(op), tuple(regs))
        with slot.cond:
            if self._stopped is not None:
                raise AgentStopped(f"the VM stopped ({self._stopped}): cannot send {describe_request(op, req.args)}")
            if slot.panic is not None:
                raise slot.panic
            slot.queue.append(req)
        if self._kick is not None:
            self._kick(cpu)
        return req

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
