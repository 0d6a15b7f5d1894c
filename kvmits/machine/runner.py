"""vCPU threads: the run loop, MMIO dispatch, pause/resume, kicks and the end of a VM.

One thread per vCPU loops on KVM_RUN. Architecture-neutral: the arm64 Machine uses it, and so
can a test with an x86 guest.

Threads and pause model
-----------------------
Each vCPU thread publishes where it is, without a lock on the hot path:

    IN_RUN   about to enter, or inside, KVM_RUN
    OUTSIDE  handling an exit in Python (an MMIO access in a device model, ...)
    PARKED   waiting in pause for resume_all()
    EXITED   the thread has ended (or was never started)

pause_all() sets the hold flag and kvm_run.immediate_exit = 1 of every vCPU, then sends the kick
signal to each thread that may be inside KVM_RUN (KVM_RUN returns EINTR: a signal arrived, or it
was entered with immediate_exit set). It returns once no thread other than the caller is IN_RUN.
A thread seen OUTSIDE counts as out: before it can enter KVM_RUN again it marks itself IN_RUN
and then checks the hold flag, which was set before pause_all() looked, so it parks instead.
So a pause guarantees that no vCPU is in KVM_RUN (what KVM's device attributes need), not that
device models are idle: one may still be finishing the exit it was handling, and device models
keep their own locks. Waiting for those to park instead could deadlock a device model that
pauses while another vCPU's exit waits on its lock.
Pauses nest and may come from several threads at once (a counter, not an owner), and a vCPU
thread may pause from its own exit path: it is OUTSIDE itself and waits for nobody but the
others, so it cannot deadlock. resume_all() undoes one pause_all(); the last one clears
immediate_exit and lets the threads run. hold(cpus) / release(cpus) do the same for some vCPUs
only, while the others run on; a vCPU runs again once no pause and no hold of it is left.
kick(cpu) only sends the signal: that vCPU leaves KVM_RUN, notices nothing to do, and re-enters.

Signals: Python runs signal handlers in the main thread only, but the kernel interrupts the
thread the signal was sent to (signal.pthread_kill), which is what makes KVM_RUN return EINTR.
That needs a handler to be installed (with SIG_DFL, SIGUSR1 would kill the process; with SIG_IGN
it would not interrupt anything): install_kick_handler() installs a no-op one from the main thread.

The end of a VM
---------------
A PSCI SYSTEM_OFF / SYSTEM_RESET (KVM_EXIT_SYSTEM_EVENT), a host stop(), or a failing vCPU
thread (an exception from a device model, KVM_RUN failing, KVM_EXIT_FAIL_ENTRY,
KVM_EXIT_INTERNAL_ERROR or any exit nobody handles) ends the VM: the first of these is kept,
every other vCPU is kicked out and its thread ends, and wait() returns the MachineExit or
re-raises the failure. Exit statuses (MachineExit.status):

    0  EXIT_POWEROFF  the guest powered off (PSCI SYSTEM_OFF: KVM_SYSTEM_EVENT_SHUTDOWN)
    1  (not a MachineExit) a vCPU thread failed: wait() raises; `kvmits run` exits with 1
    3  EXIT_RESET     the guest asked for a reset (PSCI SYSTEM_RESET: KVM_SYSTEM_EVENT_RESET);
                      kvmits does not reboot the guest, the VM ends
    4  EXIT_CRASH     KVM_SYSTEM_EVENT_CRASH or any other system event type
    5  EXIT_STOPPED   the host called stop()
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvmits import uapi
from kvmits.errors import KvmitsError

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1

IN_RUN, OUTSIDE, PARKED, EXITED = 0, 1, 2, 3
STATE_NAMES = ("IN_RUN", "OUTSIDE", "PARKED", "EXITED")

EXIT_POWEROFF = 0
EXIT_RESET = 3
EXIT_CRASH = 4
EXIT_STOPPED = 5

#: how often a waiting pause_all() looks again for a thread that is OUTSIDE for long (its
#: transition from IN_RUN to OUTSIDE is not announced, to keep the hot path lock-free)
_PAUSE_POLL = 0.002
#: how long wait() gives the vCPU threads to end once the VM has ended (they were kicked)
JOIN_TIMEOUT = 30.0


class MachineExit(NamedTuple):
    """How a VM ended: `reason` in "poweroff", "reset", "crash", "stopped"; `status` is the
    process exit status `kvmits run` uses; `cpu` the vCPU that ended it (None: the host)."""

    reason: str
    status: int
    cpu: int | None = None
    event_type: int | None = None
    flags: int = 0


class VcpuExitError(KvmitsError):
    """A vCPU exited in a way nothing handles (KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTERNAL_ERROR, ...)."""

    def __init__(self, cpu: int, exit_, detail: str = ""):
        self.cpu = cpu
        self.exit = exit_
        super().__init__(f"vCPU {cpu}: unexpected exit {exit_!r}" + (f": {detail}" if detail else ""))


def _noop_handler(signum, frame):
    """Runs in the main thread; its only job is to exist, so the signal interrupts KVM_RUN."""


def install_kick_handler(signum: int = KICK_SIGNAL) -> None:
    """Make `signum` interrupt system calls without killing the process: installs a no-op
    Python handler if none is installed. Must be called from the main thread (Python's rule)
    unless a handler is already there."""
    current = signal.getsignal(signum)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"signal {signal.Signals(signum).name} has no handler and only the main thread can "
                           "install one: call kvmits.machine.install_kick_handler() from the main thread first")
    signal.signal(signum, _noop_handler)


def system_event_exit(cpu: int, ex) -> MachineExit:
    """The MachineExit for a KVM_EXIT_SYSTEM_EVENT (api.rst, KVM_EXIT_SYSTEM_EVENT)."""
    if ex.type == uapi.KVM_SYSTEM_EVENT_SHUTDOWN:
        return MachineExit("poweroff", EXIT_POWEROFF, cpu, ex.type, ex.flags)
    if ex.type == uapi.KVM_SYSTEM_EVENT_RESET:
        return MachineExit("reset", EXIT_RESET, cpu, ex.type, ex.flags)
    return MachineExit("crash", EXIT_CRASH, cpu, ex.type, ex.flags)


class VcpuRunner:
    """The threads of `vcpus` (objects with run(), complete_mmio_read(), immediate_exit), their
    MMIO accesses dispatched to `bus` (read(cpu, gpa, size) / write(cpu, gpa, size, value)).

    `exit_handlers` maps further exit reasons to fn(cpu, exit) -> MachineExit to end the VM,
    or None to go on; KVM_EXIT_SYSTEM_EVENT is handled unless overridden; any other exit ends
    the VM with VcpuExitError.
    """

    def __init__(self, vcpus: Sequence, bus, exit_handlers: dict[int, Callable] | None = None,
                 kick_signal: int = KICK_SIGNAL):
        self.vcpus = list(vcpus)
        self.bus = bus
        self.kick_signal = kick_signal
        self._handlers: dict[int, Callable] = {uapi.KVM_EXIT_SYSTEM_EVENT: system_event_exit}
        self._handlers.update(exit_handlers or {})
        n = len(self.vcpus)
        self._states = [EXITED] * n
        self._threads: list[threading.Thread | None] = [None] * n
        lock = threading.RLock()
        #: guards the state below; notified when the VM may run on (a resume, a stop) and when it ends
        self._cond = threading.Condition(lock)
        #: notified when a vCPU thread leaves KVM_RUN for good (parked or exited): what a pause
        #: waits for. Apart from _cond so that parking wakes the pauser alone, not every parked
        #: vCPU (64 vCPUs made ~2000 wake-ups of one pause)
        self._left_run = threading.Condition(lock)
        # per vCPU: pause, hold or stop requested; checked before every KVM_RUN
        self._holds = [False] * n
        self._held = [0] * n            # hold() depth per vCPU
        self._pause_depth = 0
        self._stopping = False
        self._result: MachineExit | None = None
        self._error: BaseException | None = None
        self._started = False
        self._end_listeners: list[Callable] = []
        self._ended_notified = False
        #: KVM_RUN calls that returned EINTR, per vCPU (kicks, pauses)
        self.interrupts = [0] * n

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start one thread per vCPU. The kick signal must have a handler (install_kick_handler)."""
        if self._started:
            raise RuntimeError("vCPU threads already started")
        if not callable(signal.getsignal(self.kick_signal)):
            install_kick_handler(self.kick_signal)
        self._started = True
        with self._cond:
            for i in range(len(self.vcpus)):
                self._states[i] = IN_RUN
                t = threading.Thread(target=self._thread_main, args=(i,), name=f"vcpu{i}", daemon=True)
                self._threads[i] = t
                try:
                    t.start()
                except BaseException:
                    # a signal handler's exception (Ctrl-C, `kvmits run`'s SIGTERM) raised in
                    # Thread.start's wait for the thread, or no thread to be had: end the VM so
                    # that the threads already going stop and wait() returns. A thread that has
                    # not run yet (no ident) counts as ended and is not joined; if it does run,
                    # it finds the stop and ends at once.
                    if t.ident is None:
                        self._states[i] = EXITED
                    self.stop()
                    raise

    @property
    def started(self) -> bool:
        return self._started

    @property
    def running(self) -> bool:
        """Started and not ended."""
        return self._started and self._result is None and self._error is None

    def states(self) -> list[str]:
        return [STATE_NAMES[s] for s in self._states]

    def describe(self, cpu: int) -> str:
        """vCPU `cpu`'s thread as the runner sees it, for error messages."""
        ended = "" if self._error is None and self._result is None else \
            f", the VM ended ({self._error!r})" if self._error is not None else f", the VM ended ({self._result.reason})"
        return (f"thread {STATE_NAMES[self._states[cpu]]}, {self.interrupts[cpu]} KVM_RUN returns by a signal, "
                f"pause depth {self._pause_depth}{ended}")

    def on_vcpu_thread(self) -> bool:
        me = threading.current_thread()
        return any(t is me for t in self._threads)

    def stop(self, result: MachineExit | None = None) -> None:
        """End the VM (from any thread, a vCPU thread included): keeps `result` (default: stopped
        by the host) unless the VM already ended, and kicks every vCPU out. Does not wait."""
        with self._cond:
            if self._result is None and self._error is None:
                self._result = result or MachineExit("stopped", EXIT_STOPPED)
            self._stop_locked()
        self._kick_all()
        self._notify_end()

    def fail(self, error: BaseException) -> None:
        """End the VM with `error` (re-raised by wait()) unless it already ended; e.g. a device
        model that finds the guest dead. From any thread. Does not wait."""
        with self._cond:
            if self._result is None and self._error is None:
                self._error = error
            self._stop_locked()
        self._kick_all()
        self._notify_end()

    def add_end_listener(self, fn: Callable[[MachineExit | None, BaseException | None], None]) -> None:
        """Call fn(result, error) once when the VM ends (on the thread that ended it), e.g. to
        fail host-side requests that wait for the guest."""
        self._end_listeners.append(fn)

    def _notify_end(self) -> None:
        with self._cond:
            if self._ended_notified:
                return
            self._ended_notified = True
            result, error = self._result, self._error
        for fn in self._end_listeners:
            try:
                fn(result, error)
            except Exception:   # noqa: BLE001 - a listener's bug must not hide how the VM ended
                log.exception("end-of-VM listener %r failed", fn)

    def _stop_locked(self) -> None:
        self._stopping = True
        for i, v in enumerate(self.vcpus):
            self._holds[i] = True
            v.immediate_exit = 1
        self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> MachineExit:
        """Wait until the VM ends; return how (MachineExit) or re-raise the failure of a vCPU
        thread. TimeoutError if it still runs after `timeout` seconds (it keeps running)."""
        if self.on_vcpu_thread():
            raise RuntimeError("wait() from a vCPU thread would wait for itself")
        if not self._started:
            raise RuntimeError("the vCPU threads were not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._result is None and self._error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"the VM still runs after {timeout} s")
                self._cond.wait(remaining)
        self._join()
        if self._error is not None:
            raise self._error
        return self._result

    def _join(self) -> None:
        end = time.monotonic() + JOIN_TIMEOUT
        for t in self._threads:
            if t is not None and t.ident is not None:     # (None: see start())
                t.join(max(0.0, end - time.monotonic()))
                if t.is_alive():
                    log.warning("%s did not end within %.0f s of the VM ending", t.name, JOIN_TIMEOUT)

    # -- pause / resume / kick -------------------------------------------------------------------
    def pause_all(self, timeout: float | None = 30.0) -> None:
        """Bring every vCPU out of KVM_RUN and keep it out until resume_all(). Nests; callable
        from any thread, a vCPU thread (on its exit path) included. TimeoutError (and no pause
        held) if some vCPU is still inside KVM_RUN after `timeout` s."""
        with self._cond:
            self._pause_depth += 1
            if self._pause_depth == 1:
                for i, v in enumerate(self.vcpus):
                    self._holds[i] = True
                    v.immediate_exit = 1
        self._wait_out(range(len(self.vcpus)), timeout, self._resume_locked)

    def _wait_out(self, cpus, timeout: float | None, undo: Callable[[], None]) -> None:
        """Kick `cpus` (but the caller's own thread) out of KVM_RUN and wait until none is in
        it; on timeout call undo() with the lock held and raise TimeoutError."""
        me = threading.get_ident()
        others = [i for i in cpus if self._threads[i] is not None and self._threads[i].ident != me]
        for i in others:
            if self._states[i] == IN_RUN:
                self._signal(i)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(self._states[i] == IN_RUN for i in others):
                remaining = _PAUSE_POLL if deadline is None else min(_PAUSE_POLL, deadline - time.monotonic())
                if remaining <= 0:
                    stuck = [i for i in others if self._states[i] == IN_RUN]
                    undo()
                    raise TimeoutError(f"vCPUs {stuck} still in KVM_RUN after {timeout} s")
                self._left_run.wait(remaining)

    def hold(self, cpus: Sequence[int], timeout: float | None = 30.0) -> None:
        """Bring the vCPUs `cpus` out of KVM_RUN and keep them out until release(cpus); the
        others run on. Nests per vCPU, and with pause_all(). E.g. to run the guest's ITS
        commands on one vCPU while no other one executes guest code, as the userspace ITS runs
        them (its pause). TimeoutError (and no hold kept) after `timeout` s."""
        cpus = list(cpus)
        with self._cond:
            for i in cpus:
                self._held[i] += 1
                self._holds[i] = True
                self.vcpus[i].immediate_exit = 1
        self._wait_out(cpus, timeout, lambda: self._release_locked(cpus))

    def release(self, cpus: Sequence[int]) -> None:
        """Undo one hold(cpus)."""
        with self._cond:
            self._release_locked(list(cpus))

    def _release_locked(self, cpus: list[int]) -> None:
        if any(self._held[i] <= 0 for i in cpus):
            raise RuntimeError(f"release({cpus}) without a matching hold()")
        for i in cpus:
            self._held[i] -= 1
        self._unhold_locked()

    def resume_all(self) -> None:
        """Undo one pause_all(); the last one lets the vCPUs run again."""
        with self._cond:
            self._resume_locked()

    def _resume_locked(self) -> None:
        if self._pause_depth <= 0:
            raise RuntimeError("resume_all() without a matching pause_all()")
        self._pause_depth -= 1
        self._unhold_locked()

    def _unhold_locked(self) -> None:
        """Let run again every vCPU that no pause, hold or stop keeps out."""
        if self._pause_depth or self._stopping:
            return
        for i, v in enumerate(self.vcpus):
            if self._holds[i] and not self._held[i]:
                v.immediate_exit = 0
                self._holds[i] = False
        self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._pause_depth > 0

    def kick(self, cpu: int) -> None:
        """Make vCPU `cpu` leave KVM_RUN once (it re-enters at once unless paused or stopping).
        Signal only: if the thread is not inside KVM_RUN at that moment (it is handling an exit
        in Python), nothing happens; it re-enters KVM_RUN soon anyway, and whatever the kick was
        meant to make KVM look at again is looked at then."""
        self._signal(cpu)

    def _kick_all(self) -> None:
        me = threading.get_ident()
        for i, t in enumerate(self._threads):
            if t is not None and t.ident != me:
                self._signal(i)

    def _signal(self, cpu: int) -> None:
        t = self._threads[cpu]
        # ident is None until a just-started thread runs: it has not reached KVM_RUN either
        if t is None or t.ident is None:
            return
        # Under the lock the thread takes to mark itself EXITED (_thread_main): a thread seen
        # otherwise is still alive, so its pthread_t is still its own. Python threads are
        # detached, and pthread_kill on the pthread_t of one that has ended is undefined (the
        # descriptor may already belong to a new thread, or be freed).
        with self._cond:
            if self._states[cpu] == EXITED:
                return
            try:
                signal.pthread_kill(t.ident, self.kick_signal)
            except ProcessLookupError:
                pass                    # ended in the kernel, not yet in Python's eyes

    # -- the vCPU thread ---------------------------------------------------------------------------
    def _thread_main(self, cpu: int) -> None:
        try:
            self._loop(cpu)
        except BaseException as exc:    # any failure ends the VM and reaches wait()
            exc.add_note(f"(in the thread of vCPU {cpu})")
            if not self.running:
                log.warning("vCPU %d failed after the VM ended: %r", cpu, exc)
            self.fail(exc)
        finally:
            with self._cond:
                self._states[cpu] = EXITED
                self._cond.notify_all()
                self._left_run.notify_all()

    def _park(self, cpu: int) -> bool:
        """Wait while paused; False if the VM is stopping."""
        with self._cond:
            self._states[cpu] = PARKED
            self._left_run.notify_all()
            while (self._pause_depth > 0 or self._held[cpu]) and not self._stopping:
                self._cond.wait()
            return not self._stopping

    def _loop(self, cpu: int) -> None:
        vcpu = self.vcpus[cpu]
        run = vcpu.run
        complete_read = vcpu.complete_mmio_read
        bus_read = self.bus.read
        bus_write = self.bus.write
        states = self._states
        holds = self._holds
        handlers = self._handlers
        exit_mmio = uapi.KVM_EXIT_MMIO
        exit_intr = vcpu.EXIT_INTR          # KVM_RUN returned EINTR (kvmits.kvm.Vcpu.INTR)
        while True:
            states[cpu] = IN_RUN
            if holds[cpu]:
                if self._stopping or not self._park(cpu):
                    return
                continue
            ex = run()
            states[cpu] = OUTSIDE
            reason = ex.reason
            if reason == exit_mmio:
                if ex.is_write:
                    bus_write(cpu, ex.phys_addr, ex.size, ex.data)
                else:
                    complete_read(bus_read(cpu, ex.phys_addr, ex.size))
                continue
            if reason == exit_intr:
                self.interrupts[cpu] += 1
                continue
            handler = handlers.get(reason)
            if handler is None:
                raise VcpuExitError(cpu, ex, _describe(ex))
            result = handler(cpu, ex)
            if result is not None:
                self.stop(result)
                return


def _describe(ex) -> str:
    if ex.reason == uapi.KVM_EXIT_FAIL_ENTRY:
        return f"KVM_EXIT_FAIL_ENTRY, hardware_entry_failure_reason={ex.hardware_entry_failure_reason:#x}"
    if ex.reason == uapi.KVM_EXIT_INTERNAL_ERROR:
        return f"KVM_EXIT_INTERNAL_ERROR, suberror={ex.suberror} data={[hex(d) for d in ex.data]}"
    names = {getattr(uapi, n): n for n in dir(uapi) if n.startswith("KVM_EXIT_") and isinstance(getattr(uapi, n), int)
             and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}
    return f"exit reason {ex.reason} ({names.get(ex.reason, 'unknown')}) not handled"
