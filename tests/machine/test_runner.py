"""vCPU threads: the end of a VM, failures, pause/resume and kicks, with fake vCPUs."""

from __future__ import annotations

import re
import threading
import time

import pytest

from kvmits import uapi
from kvmits.kvm import FailEntryExit, InternalErrorExit, OtherExit, SystemEventExit
from kvmits.machine.bus import MmioBus
from kvmits.machine.runner import (
    EXIT_CRASH,
    EXIT_POWEROFF,
    EXIT_RESET,
    EXIT_STOPPED,
    MachineExit,
    VcpuExitError,
    VcpuRunner,
    install_kick_handler,
)
from tests.machine.fakes import FakeVcpu, mmio, mmio_forever

DEV = 0x0A000000
TIMEOUT = 10


class Device:
    def __init__(self, on_read=None, on_write=None):
        self.reads = 0
        self.writes = []
        self.on_read = on_read
        self.on_write = on_write

    def mmio_read(self, vcpu, offset, size):
        self.reads += 1
        if self.on_read:
            self.on_read(vcpu, offset)
        return 0x40 + vcpu

    def mmio_write(self, vcpu, offset, size, value):
        self.writes.append((vcpu, offset, size, value))
        if self.on_write:
            self.on_write(vcpu, offset, value)


def make(kicks, scripts, device=None):
    bus = MmioBus()
    device = device or Device()
    bus.add(DEV, 0x1000, device)
    runner = VcpuRunner([FakeVcpu(s) for s in scripts], bus)
    kicks.append(runner)
    return runner, device


def event(type_):
    return SystemEventExit(type_, 0)


@pytest.mark.parametrize("type_, reason, status", [
    (uapi.KVM_SYSTEM_EVENT_SHUTDOWN, "poweroff", EXIT_POWEROFF),
    (uapi.KVM_SYSTEM_EVENT_RESET, "reset", EXIT_RESET),
    (uapi.KVM_SYSTEM_EVENT_CRASH, "crash", EXIT_CRASH),
])
def test_system_event_ends_the_vm_and_kicks_the_others(kicks, type_, reason, status):
    runner, _ = make(kicks, [[], [mmio(DEV), event(type_)], []])   # vCPUs 0 and 2 idle
    runner.start()
    result = runner.wait(TIMEOUT)
    assert result == MachineExit(reason, status, 1, type_, 0)
    assert runner.states() == ["EXITED"] * 3
    assert not runner.running


def test_describe_a_vcpu_for_error_messages(kicks):
    runner, _ = make(kicks, [[], [event(uapi.KVM_SYSTEM_EVENT_SHUTDOWN)]])
    runner.start()
    runner.wait(TIMEOUT)
    # (vCPU 0 may or may not have entered KVM_RUN before the VM ended)
    assert re.fullmatch(r"thread EXITED, [01] KVM_RUN returns by a signal, pause depth 0, the VM ended \(poweroff\)",
                        runner.describe(0))


def test_mmio_goes_to_the_bus_with_the_vcpu_index(kicks):
    scripts = [[mmio(DEV + 8), mmio(DEV + 0x10, 8, True, 0x1122334455667788), event(uapi.KVM_SYSTEM_EVENT_SHUTDOWN)],
               [mmio(DEV + 8)]]
    runner, dev = make(kicks, scripts)
    runner.start()
    assert runner.wait(TIMEOUT).reason == "poweroff"
    assert runner.vcpus[0].completed_reads == [0x40]
    assert dev.writes == [(0, 0x10, 8, 0x1122334455667788)]
    # vCPU 1 may or may not have reached its read before vCPU 0 powered off
    assert runner.vcpus[1].completed_reads in ([], [0x41])


def test_a_failing_device_model_stops_the_vm_and_wait_reraises(kicks):
    def boom(vcpu, offset):
        raise ZeroDivisionError("device model bug")

    runner, _ = make(kicks, [[], [mmio(DEV)]], Device(on_read=boom))
    runner.start()
    with pytest.raises(ZeroDivisionError, match="device model bug") as info:
        runner.wait(TIMEOUT)
    assert any("vCPU 1" in note for note in info.value.__notes__)
    assert runner.states() == ["EXITED", "EXITED"]


@pytest.mark.parametrize("bad_exit, words", [
    (FailEntryExit(0x1234, 0), "KVM_EXIT_FAIL_ENTRY"),
    (InternalErrorExit(1, (5, 6)), "KVM_EXIT_INTERNAL_ERROR"),
    (OtherExit(uapi.KVM_EXIT_HLT), "KVM_EXIT_HLT"),
])
def test_unexpected_exits_stop_the_vm(kicks, bad_exit, words):
    runner, _ = make(kicks, [[bad_exit], []])
    runner.start()
    with pytest.raises(VcpuExitError, match=words) as info:
        runner.wait(TIMEOUT)
    assert info.value.cpu == 0


def test_extra_exit_handlers(kicks):
    seen = []

    def on_hlt(cpu, ex):
        seen.append(cpu)
        return MachineExit("halted", 7, cpu) if len(seen) == 2 else None

    bus = MmioBus()
    runner = VcpuRunner([FakeVcpu([OtherExit(uapi.KVM_EXIT_HLT), OtherExit(uapi.KVM_EXIT_HLT)])], bus,
                        exit_handlers={uapi.KVM_EXIT_HLT: on_hlt})
    kicks.append(runner)
    runner.start()
    assert runner.wait(TIMEOUT) == MachineExit("halted", 7, 0)
    assert seen == [0, 0]


def test_wait_timeout_then_host_stop(kicks):
    runner, _ = make(kicks, [[], []])
    runner.start()
    with pytest.raises(TimeoutError):
        runner.wait(0.05)
    assert runner.running
    runner.stop()
    assert runner.wait(TIMEOUT) == MachineExit("stopped", EXIT_STOPPED)
    runner.stop(MachineExit("poweroff", 0))           # the first ending is kept
    assert runner.wait(TIMEOUT).reason == "stopped"


def test_pause_holds_every_vcpu_outside_run(kicks):
    runner, dev = make(kicks, [mmio_forever(DEV), mmio_forever(DEV + 4), []])
    runner.start()
    deadline = time.monotonic() + TIMEOUT
    while dev.reads < 50 and time.monotonic() < deadline:
        time.sleep(0.001)
    runner.pause_all(TIMEOUT)
    try:
        assert runner.paused
        assert not any(v.inside for v in runner.vcpus)
        assert set(runner.states()) <= {"PARKED", "OUTSIDE"}
        # a thread seen OUTSIDE may still finish the exit it was handling, then parks
        time.sleep(0.02)
        assert runner.states() == ["PARKED"] * 3
        before = dev.reads
        time.sleep(0.05)
        assert dev.reads == before
        assert all(v.immediate_exit == 1 for v in runner.vcpus)
        runner.pause_all(TIMEOUT)                         # nested
        runner.resume_all()
        time.sleep(0.02)
        assert dev.reads == before                        # still paused: one level left
    finally:
        runner.resume_all()
    assert all(v.immediate_exit == 0 for v in runner.vcpus)
    deadline = time.monotonic() + TIMEOUT
    while dev.reads < before + 50 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert dev.reads >= before + 50
    with pytest.raises(RuntimeError):
        runner.resume_all()
    runner.stop()
    runner.wait(TIMEOUT)


def test_hold_keeps_some_vcpus_out_while_the_others_run(kicks):
    reads = [0, 0, 0]

    def count(vcpu, offset):
        reads[vcpu] += 1

    runner, dev = make(kicks, [mmio_forever(DEV), mmio_forever(DEV + 4), mmio_forever(DEV + 8)],
                       Device(on_read=count))
    runner.start()

    def wait_for(cpu, n):
        deadline = time.monotonic() + TIMEOUT
        while reads[cpu] < n and time.monotonic() < deadline:
            time.sleep(0.001)
        assert reads[cpu] >= n

    wait_for(1, 20)
    wait_for(2, 20)
    runner.hold([1, 2], TIMEOUT)
    try:
        time.sleep(0.02)                                  # one may finish the exit it was handling
        assert runner.states()[1:] == ["PARKED", "PARKED"]
        held = reads[1:]
        start = reads[0]
        wait_for(0, start + 50)                           # vCPU 0 runs on
        runner.pause_all(TIMEOUT)                         # a pause on top of the hold ...
        runner.resume_all()                               # ... and its end leave 1 and 2 held
        runner.hold([2], TIMEOUT)                         # nested, per vCPU
        runner.release([1, 2])
        wait_for(1, held[0] + 50)                         # 1 runs again, 2 is still held
        assert reads[2] == held[1] and runner.vcpus[2].immediate_exit == 1
        assert runner.vcpus[1].immediate_exit == 0
    finally:
        runner.release([2])
    wait_for(2, held[1] + 50)
    with pytest.raises(RuntimeError, match="without a matching hold"):
        runner.release([0])
    runner.stop()
    runner.wait(TIMEOUT)


def test_pause_from_a_vcpu_thread_does_not_deadlock(kicks):
    """A device model on vCPU 1's exit path pauses the VM (as a userspace ITS will), while the
    host pauses too; every pause completes and the guest goes on."""
    done = []
    runner = None

    def pausing_write(vcpu, offset, value):
        runner.pause_all(TIMEOUT)
        try:
            # the others are out of KVM_RUN; this thread itself is OUTSIDE
            assert not any(v.inside for i, v in enumerate(runner.vcpus) if i != vcpu)
            done.append(value)
        finally:
            runner.resume_all()

    writes = [mmio(DEV, 4, True, n) for n in range(20)]
    runner, dev = make(kicks, [mmio_forever(DEV + 4), writes + [event(uapi.KVM_SYSTEM_EVENT_SHUTDOWN)], []],
                       Device(on_write=pausing_write))

    host_pauses = []

    def host():
        while True:
            runner.pause_all(TIMEOUT)
            host_pauses.append(1)
            runner.resume_all()
            if not runner.running:
                break

    runner.start()
    t = threading.Thread(target=host)
    t.start()
    result = runner.wait(TIMEOUT)
    t.join(TIMEOUT)
    assert result.reason == "poweroff" and result.cpu == 1
    assert done == list(range(20))
    assert host_pauses


def test_pause_before_start_parks_the_threads(kicks):
    runner, dev = make(kicks, [mmio_forever(DEV)])
    runner.pause_all()
    runner.start()
    time.sleep(0.05)
    assert dev.reads == 0 and runner.states() == ["PARKED"]
    runner.resume_all()
    deadline = time.monotonic() + TIMEOUT
    while dev.reads == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert dev.reads > 0
    runner.stop()
    runner.wait(TIMEOUT)


def test_kick_makes_an_idle_vcpu_reenter(kicks):
    runner, _ = make(kicks, [[]])
    runner.start()
    for n in range(1, 4):
        runner.kick(0)
        deadline = time.monotonic() + TIMEOUT
        while runner.interrupts[0] < n and time.monotonic() < deadline:
            time.sleep(0.001)
        assert runner.interrupts[0] == n
    assert runner.running
    runner.stop()
    assert runner.wait(TIMEOUT).reason == "stopped"


def test_stop_from_a_device_model(kicks):
    runner = None

    def stopper(vcpu, offset):
        runner.stop(MachineExit("poweroff", 0, vcpu))

    runner, _ = make(kicks, [[], [mmio(DEV)]], Device(on_read=stopper))
    runner.start()
    assert runner.wait(TIMEOUT) == MachineExit("poweroff", 0, 1)


def test_wait_from_a_vcpu_thread_is_refused(kicks):
    errors = []
    runner = None

    def waiter(vcpu, offset):
        try:
            runner.wait(0.01)
        except RuntimeError as exc:
            errors.append(exc)

    runner, _ = make(kicks, [[mmio(DEV), event(uapi.KVM_SYSTEM_EVENT_SHUTDOWN)]], Device(on_read=waiter))
    runner.start()
    runner.wait(TIMEOUT)
    assert len(errors) == 1 and "itself" in str(errors[0])


def test_pause_after_the_end_returns_at_once(kicks):
    runner, _ = make(kicks, [[event(uapi.KVM_SYSTEM_EVENT_SHUTDOWN)], []])
    runner.start()
    runner.wait(TIMEOUT)
    runner.pause_all(1)
    runner.resume_all()


def test_kick_handler_needs_the_main_thread():
    import signal

    sig = signal.SIGUSR2
    old = signal.getsignal(sig)
    signal.signal(sig, signal.SIG_DFL)
    try:
        errors = []
        t = threading.Thread(target=lambda: _catch(errors, install_kick_handler, sig))
        t.start()
        t.join()
        assert len(errors) == 1 and "main thread" in str(errors[0])
        install_kick_handler(sig)
        assert callable(signal.getsignal(sig))
    finally:
        signal.signal(sig, old)


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except RuntimeError as exc:
        errors.append(exc)


def test_fail_and_end_listeners(kicks):
    ends = []
    runner, _ = make(kicks, [[], []])
    runner.add_end_listener(lambda result, error: ends.append((result, error)))
    runner.start()
    err = RuntimeError("guest agent panicked")
    runner.fail(err)
    with pytest.raises(RuntimeError, match="panicked"):
        runner.wait(TIMEOUT)
    runner.stop()                                   # later endings change nothing
    assert ends == [(None, err)]


def test_end_listener_sees_a_poweroff(kicks):
    ends = []
    runner, _ = make(kicks, [[event(uapi.KVM_SYSTEM_EVENT_SHUTDOWN)]])
    runner.add_end_listener(lambda result, error: ends.append((result.reason, error)))
    runner.start()
    runner.wait(TIMEOUT)
    assert ends == [("poweroff", None)]


@pytest.mark.parametrize("launched", [True, False], ids=["interrupted-after-launch", "never-launched"])
def test_start_interrupted_between_threads_ends_the_vm(kicks, monkeypatch, launched):
    # What a SIGTERM (kvmits run raises from its handler) or Ctrl-C does when it lands in
    # Thread.start()'s wait for vCPU 1's thread: vCPU 0 runs, vCPU 1's thread may or may not
    # exist and has no ident yet. start() re-raises; the VM has ended and nothing waits for ever.
    runner, _ = make(kicks, [mmio_forever(DEV), mmio_forever(DEV), mmio_forever(DEV)])
    real_start = threading.Thread.start

    def start(self):
        if self.name == "vcpu1":
            if launched:
                real_start(self)
            raise KeyboardInterrupt
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        runner.start()
    monkeypatch.undo()
    assert runner.wait(TIMEOUT) == MachineExit("stopped", EXIT_STOPPED)
    assert runner.states() == ["EXITED"] * 3
    runner.pause_all(TIMEOUT)           # nothing is counted as inside KVM_RUN
    runner.resume_all()
