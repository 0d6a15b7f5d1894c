"""The guest agent's mailbox: the MMIO device through which the host drives a guest program.

The agent polls MB_REQ on each vCPU for the next request the host posted for that vCPU, reads
its arguments, performs it and writes MB_RESULT or MB_ERROR; it reports HELLO when a vCPU comes
online, every interrupt it takes (MB_IRQ), and a panic. This module is that device: the per-vCPU
request queues, the Request a host waits on, and the reports. The protocol is
kvmits.machine.agent.protocol; the typed host API over post() is kvmits.machine.agent.host.Agent.

Request lives here, with the queue that completes it, not with the host API: its state is
guarded by its vCPU's slot lock (_Cpu.cond), the vCPU thread completes it from mmio_write, and
a wait that times out withdraws it from that slot's queue. Only the device touches those.

save_state()/load_state() carry what the guest agent relies on between requests to another VM
(issue 13, with kvmits.machine.state); a Request cannot travel, so a mailbox saves only idle.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from kvmits.machine.agent.protocol import (
    ADDRESSED_OPS, AGENT_VERSION, DEFAULT_IDLE_US, DEFAULT_TIMEOUT, ERR_DETAIL_SHIFT, MAILBOX_BASE, MAILBOX_SIZE,
    MB_ARG0, MB_ARG3, MB_ERROR, MB_GICD_BASE, MB_GICR_BASE, MB_HELLO, MB_IDLE_US, MB_IRQ, MB_PANIC, MB_PANIC_FAR,
    MB_PANIC_KIND, MB_REQ, MB_RESULT, MB_VERSION, U64_MASK, AgentError, AgentPanic, AgentProtocolError, AgentRequestFailed,
    AgentStopped, AgentTimeout, Op, describe_request,
)
from kvmits.machine.saved_state import StateChecker

log = logging.getLogger(__name__)

#: vCPU indices a mailbox accepts (a slot per index up to the highest used)
MAX_CPUS = 1 << 16

STATE_FORMAT = "kvmits-agent-mailbox"
STATE_VERSION = 1
#: the most interrupt reports a state carries. The device keeps every report until the host
#: takes it, so the bound is only against an edited file's allocation: a host that lets a
#: million reports pile up has stopped reading them
IRQS_STATE_MAX = 1 << 20
_STATE_KEYS = frozenset(("format", "version", "cpus", "irqs", "bad_accesses"))
_CPU_KEYS = frozenset(("mpidr", "online", "version", "hello_age_ns", "panic_regs"))
#: ages are nanoseconds before the save, as an int (exact in JSON); 2^63 ns is 292 years
_AGE_LIMIT = 1 << 63


class MailboxStateError(AgentError):
    """The mailbox cannot be saved now: an agent panicked, or a request is queued or running."""


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
        if not 0 <= vcpu < MAX_CPUS:
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

    # -- the host side: save and restore (issue 13) ---------------------------------------------------
    @staticmethod
    def _busy(slot: _Cpu) -> list[str]:
        """slot's running and queued requests, described (slot.cond held)."""
        out = []
        req = slot.current
        if req is not None:
            # a request whose host wait timed out is still in the guest's registers until it answers
            late = ", its host wait timed out" if req._state == _DONE else ""
            out.append(f"vCPU {slot.index}: {describe_request(req.op, req.args)} (running{late})")
        out += [f"vCPU {slot.index}: {describe_request(r.op, r.args)} (queued)" for r in slot.queue]
        return out

    def busy(self) -> list[str]:
        """The requests queued or running, described vCPU by vCPU; empty when save_state() can
        proceed (so far as requests go). For a caller that waits for them before saving."""
        out = []
        for slot in list(self._cpus):
            with slot.cond:
                out += self._busy(slot)
        return out

    def save_state(self) -> dict:
        """What the guest agent relies on between requests, as a JSON-able dict: per vCPU (the
        list index) its HELLO (mpidr, online, and how long before the save it came), the protocol
        version it wrote, and the panic registers (FAR, ELR, kind: the agent writes them before
        MB_PANIC, so a save can fall between); the interrupt reports the host has not taken yet,
        oldest first, each (cpu, intid, nanoseconds before the save); and bad_accesses.

        Not state, so left out: gicd_base, gicr_base and idle_us are construction parameters of
        the destination, like kick, on_panic and describe_cpu (the agent read the first three
        once at boot and keeps them: the destination, built from the saved machine configuration,
        must give the same); also the once-only log memory of bad accesses, and a stop() (a
        VM being saved is one still running).

        MailboxStateError (an AgentError, so a KvmitsError) if an agent panicked (its vCPU is
        parked: there is nothing to resume) or while any request is queued or running: the
        running one lives in the guest's registers and the host's Request, which a waiting
        thread holds, cannot travel. The caller waits for busy() to be empty first, with no
        request posted meanwhile; the vCPUs must be paused (no access races the save).
        MailboxStateError too if more than IRQS_STATE_MAX reports wait (take_irqs() them)."""
        # Lock order, as nowhere else nests them: _lock (no slot is added meanwhile), every
        # slot.cond (no request is posted), _events (the reports): one consistent snapshot.
        with contextlib.ExitStack() as held:
            held.enter_context(self._lock)
            slots = list(self._cpus)
            for slot in slots:
                held.enter_context(slot.cond)
            held.enter_context(self._events)
            panics = list(self._panics)
            panics += [s.panic for s in slots if s.panic is not None and s.panic not in panics]
            if panics:
                more = f" (and {len(panics) - 1} more panic(s))" if len(panics) > 1 else ""
                raise MailboxStateError(f"the agent's mailbox cannot be saved: {panics[0]}{more}; a panicked "
                                        f"agent has parked its vCPU, there is nothing to resume")
            busy = [d for s in slots for d in self._busy(s)]
            if busy:
                raise MailboxStateError(f"the agent's mailbox cannot be saved while requests are outstanding: "
                                        f"{'; '.join(busy)} (wait for them: busy() empty)")
            if len(self._irqs) > IRQS_STATE_MAX:
                raise MailboxStateError(f"the agent's mailbox holds {len(self._irqs)} interrupt reports, more "
                                        f"than a state carries ({IRQS_STATE_MAX}): take_irqs() them first")
            now = time.monotonic()

            def age(t: float) -> int:       # monotonic in t, so the reports' order is kept
                return max(0, round((now - t) * 1e9))

            return {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "cpus": [{"mpidr": s.mpidr, "online": s.online, "version": s.version,
                          "hello_age_ns": age(s.hello_time) if s.online else None,
                          "panic_regs": list(s.panic_regs)} for s in slots],
                "irqs": [[cpu, intid, age(t)] for cpu, intid, t in self._irqs],
                "bad_accesses": self.bad_accesses,
            }

    def load_state(self, state: dict) -> None:
        """Apply a save_state() dict, on a freshly constructed mailbox before any vCPU runs.

        The dict is not trusted (it may come from a file a user edited): every field is checked
        first (ValueError naming it; the mailbox is left unchanged), then applied. The saved
        times (HELLO, interrupt reports) are re-based to this host's time.monotonic(): each is as
        long before the load as it was before the save, so the reports keep their order. The
        waits (wait_online, wait_irqs) are woken: they answer at once from the restored state. A
        vCPU slot beyond the state's (a host call on this mailbox created it) is reset to
        'not online'."""
        cpus, irqs, bad_accesses = _check_state(state)
        if cpus:
            self._slot(len(cpus) - 1)           # every slot up to the last saved one
        now = time.monotonic()
        with self._lock:
            slots = list(self._cpus)
            self.bad_accesses = bad_accesses
        with self._events:
            for i, slot in enumerate(slots):
                mpidr, online, version, hello_age, panic_regs = cpus[i] if i < len(cpus) else (None, False, None,
                                                                                                None, (0, 0, 0))
                slot.mpidr = mpidr
                slot.online = online
                slot.version = version
                slot.hello_time = now - hello_age / 1e9 if hello_age is not None else 0.0
                slot.panic_regs = list(panic_regs)
            self._irqs = [(cpu, intid, now - age / 1e9) for cpu, intid, age in irqs]
            self._events.notify_all()

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


# -- checking a state --------------------------------------------------------------------------------
_CHECK = StateChecker("agent mailbox", STATE_FORMAT, STATE_VERSION)


def _check_state(state) -> tuple[list[tuple], list[tuple[int, int, int]], int]:
    """Every field of a mailbox state, checked: (per vCPU (mpidr, online, version, hello age,
    panic registers), the interrupt reports (cpu, intid, age), bad_accesses). ValueError naming
    the first bad field."""
    _CHECK.header(state, _STATE_KEYS)
    saved_cpus = _CHECK.list(state["cpus"], "cpus", MAX_CPUS)
    cpus = []
    for i, c in enumerate(saved_cpus):
        what = f"cpus[{i}]"
        _CHECK.fields(c, _CPU_KEYS, what)
        mpidr, online, version, hello_age, panic_regs = (c["mpidr"], c["online"], c["version"], c["hello_age_ns"],
                                                          c["panic_regs"])
        if mpidr is not None:
            _CHECK.int(mpidr, f"{what}.mpidr", 1 << 64)
        if type(online) is not bool:
            raise _CHECK.error(f"{what}.online must be a bool, not {online!r}")
        # HELLO sets mpidr, online and the HELLO time together, and nothing unsets them
        if online != (mpidr is not None):
            raise _CHECK.error(f"{what}.online is {online} but {what}.mpidr is {mpidr!r} "
                               f"(HELLO sets both)")
        if version is not None:
            _CHECK.int(version, f"{what}.version", 1 << 64)
        if hello_age is None:
            if online:
                raise _CHECK.error(f"{what}.hello_age_ns is missing for an online vCPU")
        else:
            _CHECK.int(hello_age, f"{what}.hello_age_ns", _AGE_LIMIT)
            if not online:
                raise _CHECK.error(f"{what}.hello_age_ns is set for a vCPU that is not online")
        if not isinstance(panic_regs, (list, tuple)) or len(panic_regs) != 3:
            raise _CHECK.error(f"{what}.panic_regs must be a list of 3 integers (FAR, ELR, kind)")
        regs = tuple(_CHECK.int(v, f"{what}.panic_regs[{j}]", 1 << 64) for j, v in enumerate(panic_regs))
        cpus.append((mpidr, online, version, hello_age, regs))

    saved_irqs = _CHECK.list(state["irqs"], "irqs", IRQS_STATE_MAX, "reports")
    irqs = []
    for i, r in enumerate(saved_irqs):
        what = f"irqs[{i}]"
        if not isinstance(r, (list, tuple)) or len(r) != 3:
            raise _CHECK.error(f"{what} must be a list [cpu, intid, age_ns], not {r!r}")
        cpu = _CHECK.int(r[0], f"{what} cpu", MAX_CPUS)
        intid = _CHECK.int(r[1], f"{what} intid", 1 << 32)      # MB_IRQ is a 32-bit write
        age = _CHECK.int(r[2], f"{what} age_ns", _AGE_LIMIT)
        if irqs and age > irqs[-1][2]:
            raise _CHECK.error(f"{what} is older than irqs[{i - 1}] (reports are oldest first)")
        irqs.append((cpu, intid, age))

    bad_accesses = _CHECK.int(state["bad_accesses"], "bad_accesses", 1 << 64)
    return cpus, irqs, bad_accesses
