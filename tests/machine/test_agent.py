"""The agent's mailbox device against a fake guest: a thread that makes the accesses the real
agent (guests/agent/agent.c) makes, in the same order, through mmio_read/mmio_write."""

from __future__ import annotations

import logging
import platform
import re
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kvmits.machine import agent as A
from kvmits.machine.agent import (Agent, AgentMailbox, AgentError, AgentPanic, AgentProtocolError, AgentRequestFailed,
                                  AgentStopped, AgentTimeout, ErrorCode, IrqMode, Op, SysReg)

ROOT = Path(__file__).resolve().parents[2]
MAILBOX_H = ROOT / "guests" / "include" / "mailbox.h"
GICD = 0x0800_0000


def gicr(cpu: int) -> int:
    return 0x080A_0000 + cpu * 0x20000


FAULT_ADDR = 0xDEAD_0000
FAULT_ESR = 0x9600_0021            # data abort, same EL, alignment fault


class FakeAgent(threading.Thread):
    """One vCPU running the agent: HELLO, then the request loop, through the device's bus methods."""

    def __init__(self, dev: AgentMailbox, cpu: int, memory: dict | None = None, version: int = A.AGENT_VERSION,
                 answer: bool = True):
        super().__init__(daemon=True, name=f"fake-agent-{cpu}")
        self.dev, self.cpu, self.version, self.answer = dev, cpu, version, answer
        self.memory = {} if memory is None else memory
        self.mpidr = 0x8000_0000 | A.kvm_default_mpidr(cpu)
        self.kicked = threading.Event()
        self.halt = threading.Event()
        self.config = None
        self.cpu_on = []
        self.served = []

    def rd(self, off: int, size: int = 8) -> int:
        return self.dev.mmio_read(self.cpu, off, size)

    def wr(self, off: int, value: int, size: int = 8) -> None:
        self.dev.mmio_write(self.cpu, off, size, value)

    def run(self):
        self.wr(A.MB_VERSION, self.version)
        self.config = (self.rd(A.MB_GICD_BASE), self.rd(A.MB_GICR_BASE), self.rd(A.MB_IDLE_US))
        self.wr(A.MB_HELLO, self.mpidr)
        while not self.halt.is_set():
            op = self.rd(A.MB_REQ)
            if op == Op.WAIT:
                self.kicked.wait(0.01)      # WFI, bounded like the agent's idle timer
                self.kicked.clear()
                continue
            self.served.append(op)
            if not self.answer:             # a guest stuck in the middle of a request
                self.halt.wait()
                return
            self.serve(op)

    def serve(self, op: int) -> None:
        if op == Op.PING:
            return self.wr(A.MB_RESULT, self.rd(A.MB_ARG0))
        if op == Op.READ:
            addr, width = self.rd(A.MB_ARG0), self.rd(A.MB_ARG1)
            if addr == FAULT_ADDR:
                return self.wr(A.MB_ERROR, ErrorCode.FAULT | FAULT_ESR << A.ERR_DETAIL_SHIFT)
            return self.wr(A.MB_RESULT, self.memory.get(addr, 0) & ((1 << 8 * width) - 1))
        if op == Op.WRITE:
            addr, _width, value = self.rd(A.MB_ARG0), self.rd(A.MB_ARG1), self.rd(A.MB_ARG2)
            self.memory[addr] = value
            return self.wr(A.MB_RESULT, 0)
        if op == Op.SYSREG_READ:
            if self.rd(A.MB_ARG0) == SysReg.MPIDR_EL1:
                return self.wr(A.MB_RESULT, self.mpidr)
            return self.wr(A.MB_ERROR, ErrorCode.BAD_ARG)
        if op == Op.CPU_ON:
            target = self.rd(A.MB_ARG0)
            already = target in self.cpu_on
            self.cpu_on.append(target)
            return self.wr(A.MB_RESULT, (-4 if already else 0) & (2**64 - 1))
        return self.wr(A.MB_ERROR, ErrorCode.UNKNOWN_OP | op << A.ERR_DETAIL_SHIFT)

    def stop(self):
        self.halt.set()
        self.kicked.set()
        self.join(5)


class Rig:
    """A device plus fake guests; the kick goes to the fake guest's 'WFI'."""

    def __init__(self, **kw):
        self.fakes: dict[int, FakeAgent] = {}
        self.kicks: list[int] = []
        self.mailbox = AgentMailbox(GICD, gicr, self.kick, **kw)
        self.dev = Agent(self.mailbox)

    def kick(self, cpu):
        self.kicks.append(cpu)
        if cpu in self.fakes:
            self.fakes[cpu].kicked.set()

    def boot(self, cpu, **kw) -> FakeAgent:
        f = FakeAgent(self.mailbox, cpu, **kw)
        self.fakes[cpu] = f
        f.start()
        return f

    def close(self):
        for f in self.fakes.values():
            f.stop()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


# -- the protocol has one definition -----------------------------------------------------------------
def _header_defines() -> dict[str, int]:
    out = {}
    for m in re.finditer(r"^#define\s+(\w+)\s+(0x[0-9A-Fa-f]+|\d+)\b", MAILBOX_H.read_text(), re.MULTILINE):
        out[m.group(1)] = int(m.group(2), 0)
    return out


def test_python_constants_match_mailbox_h():
    defines = _header_defines()
    groups = {"OP_": Op, "SYSREG_": SysReg, "IRQ_MODE_": IrqMode}
    checked = 0
    for name, value in defines.items():
        for prefix, enum in groups.items():
            if name.startswith(prefix):
                assert enum[name[len(prefix):]] == value, name
                break
        else:
            if name.startswith("ERR_") and name != "ERR_DETAIL_SHIFT":
                assert ErrorCode[name[4:]] == value, name
            else:
                assert getattr(A, name) == value, name
        checked += 1
    # and nothing in Python that the header lacks
    for prefix, enum in groups.items():
        assert {prefix + m.name for m in enum} <= set(defines), prefix
    assert {"ERR_" + m.name for m in ErrorCode} <= set(defines)
    assert checked > 50


def test_kvm_default_mpidr_layout():
    assert A.kvm_default_mpidr(0) == 0
    assert A.kvm_default_mpidr(15) == 0xF
    assert A.kvm_default_mpidr(16) == 0x100
    assert A.kvm_default_mpidr(0x123) == 0x1203
    assert A.kvm_default_mpidr(0x1000) == 0x10000


# -- requests ------------------------------------------------------------------------------------------
def test_hello_config_and_round_trips(rig):
    f = rig.boot(0, memory={0x4000_1000: 0x1122_3344_5566_7788})
    rig.dev.wait_online([0], timeout=5)
    assert f.config == (GICD, gicr(0), A.DEFAULT_IDLE_US)
    assert rig.dev.mpidr(0) == f.mpidr and rig.dev.online() == [0]
    assert rig.dev.ping(0, 0xFEED) == 0xFEED
    assert rig.dev.read(0, 0x4000_1000, 4) == 0x5566_7788
    assert rig.dev.read(0, 0x4000_1000, 8) == 0x1122_3344_5566_7788
    rig.dev.write(0, 0x4000_2000, 2, 0x1_BEEF)          # masked to the width
    assert f.memory[0x4000_2000] == 0xBEEF
    assert rig.dev.read_sysreg(0, SysReg.MPIDR_EL1) == f.mpidr
    assert rig.dev.call(0, Op.PING, -1) == 2**64 - 1     # negative arguments: two's complement
    assert 0 in rig.kicks


def test_requests_go_to_their_vcpu(rig):
    fakes = [rig.boot(c, memory={0x100: 1000 + c}) for c in range(3)]
    rig.dev.wait_online(3, timeout=5)
    assert [f.config[1] for f in fakes] == [gicr(c) for c in range(3)]
    # posted together, each answered by its own vCPU
    reqs = [rig.dev.post(c, Op.READ, 0x100, 4) for c in (2, 0, 1, 2)]
    assert [r.wait(5) for r in reqs] == [1002, 1000, 1001, 1002]
    assert [len(f.served) for f in fakes] == [1, 1, 2]
    assert [rig.dev.client(c).read(0x100, 4) for c in range(3)] == [1000, 1001, 1002]
    rig.dev.client(1).write(0x200, 4, 7)
    assert fakes[1].memory[0x200] == 7 and 0x200 not in fakes[0].memory


def test_many_requests_from_many_host_threads(rig):
    rig.boot(0)
    rig.boot(1)
    results = {}

    def worker(n):
        results[n] = [rig.dev.ping(n % 2, n * 1000 + i) for i in range(50)]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {n: [n * 1000 + i for i in range(50)] for n in range(4)}


def test_guest_errors_become_exceptions(rig):
    rig.boot(0)
    with pytest.raises(AgentRequestFailed, match=r"READ\(0xdead0000, 0x4\) failed with FAULT.*data abort") as e:
        rig.dev.read(0, FAULT_ADDR, 4)
    assert e.value.code == ErrorCode.FAULT and e.value.detail == FAULT_ESR and e.value.cpu == 0
    with pytest.raises(AgentRequestFailed, match="UNKNOWN_OP"):
        rig.dev.call(0, 42)
    with pytest.raises(AgentRequestFailed, match=r"SYSREG_READ\(ICC_RPR_EL1\) failed with BAD_ARG"):
        rig.dev.read_sysreg(0, SysReg.ICC_RPR_EL1)
    assert rig.dev.ping(0, 5) == 5                        # and the agent serves on


def test_cpu_on_returns_signed_psci_and_start_cpus_checks_it(rig):
    f = rig.boot(0)
    assert rig.dev.cpu_on(0, 0x1) == 0
    assert rig.dev.cpu_on(0, 0x1) == -4
    assert f.cpu_on == [1, 1]
    with pytest.raises(AgentError, match="ALREADY_ON"):
        rig.dev.start_cpus([1])


def test_start_cpus_waits_for_hello(rig):
    rig.boot(0)

    def bring_up():                      # the "PSCI" brings the secondaries up a little later
        for c in (1, 2, 3):
            time.sleep(0.02)
            rig.boot(c)

    t = threading.Thread(target=bring_up)
    t.start()
    rig.dev.start_cpus(4, timeout=5)
    t.join()
    assert rig.fakes[0].cpu_on == [A.kvm_default_mpidr(c) for c in (1, 2, 3)]
    assert sorted(rig.dev.online()) == [0, 1, 2, 3]


def test_argument_checks_on_the_host(rig):
    with pytest.raises(ValueError, match="at most 4"):
        rig.dev.post(0, Op.PING, 1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="64 bits"):
        rig.dev.post(0, Op.PING, 1 << 64)
    with pytest.raises(ValueError, match="width"):
        rig.dev.read(0, 0x100, 3)
    with pytest.raises(ValueError, match="count"):
        rig.dev.timed_read(0, 0x100, 4, 0)
    with pytest.raises(ValueError, match="own mailbox"):
        rig.dev.timed_read(0, A.MAILBOX_BASE + A.MB_REQ, 8, 10)
    assert rig.kicks == []                                # nothing was posted


# -- timeouts --------------------------------------------------------------------------------------------
def test_timeout_names_the_op_and_vcpu_and_withdraws_the_request(rig):
    with pytest.raises(AgentTimeout, match=r"vCPU 3: READ\(0x8000004, 0x4\) not completed within 0.1 s \(still "
                                           r"queued"):
        rig.dev.read(3, 0x0800_0004, 4, timeout=0.1)
    assert rig.kicks == [3]
    assert rig.mailbox.mmio_read(3, A.MB_REQ, 8) == Op.WAIT   # the guest never sees the withdrawn request


def test_timeout_says_what_the_vmm_knows_of_the_vcpu():
    rig = Rig(describe_cpu=lambda cpu: f"thread IN_RUN (vCPU {cpu})")
    with pytest.raises(AgentTimeout) as e:
        rig.dev.read(2, 0x0800_0004, 4, timeout=0.05)
    assert e.value.__notes__ == ["vCPU 2 at the timeout: thread IN_RUN (vCPU 2)"]


def test_timeout_of_a_request_taken_and_never_answered(rig):
    f = rig.boot(0, answer=False)
    with pytest.raises(AgentTimeout, match="never answered"):
        rig.dev.ping(0, 1, timeout=0.2)
    f.stop()
    # a late answer completes nothing and raises nothing
    rig.mailbox.mmio_write(0, A.MB_RESULT, 8, 1)
    assert rig.mailbox.mmio_read(0, A.MB_REQ, 8) == Op.WAIT


def test_a_request_dropped_by_the_guest_fails(rig):
    req = rig.dev.post(0, Op.PING, 9)
    assert rig.mailbox.mmio_read(0, A.MB_REQ, 8) == Op.PING
    assert rig.mailbox.mmio_read(0, A.MB_ARG0, 8) == 9
    assert rig.mailbox.mmio_read(0, A.MB_REQ, 8) == Op.WAIT   # asked again without answering
    with pytest.raises(AgentProtocolError, match=r"took PING\(0x9\)"):
        req.wait(1)


def test_wait_online_timeout_and_version(rig):
    rig.boot(0)
    rig.boot(1, version=A.AGENT_VERSION + 1)
    with pytest.raises(AgentTimeout, match=r"vCPU\(s\) \[2\]"):
        rig.dev.wait_online([0, 2], timeout=0.1)
    with pytest.raises(AgentProtocolError, match="version 2"):
        rig.dev.wait_online([0, 1], timeout=5)


def test_stop_fails_outstanding_waits_at_once(rig):
    req = rig.dev.post(0, Op.PING, 1)
    done = []

    def waiter():
        try:
            req.wait(30)
        except AgentStopped as exc:
            done.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    rig.dev.stop("poweroff")
    t.join(5)
    assert done and "poweroff" in str(done[0])
    with pytest.raises(AgentStopped):
        rig.dev.post(0, Op.PING)
    with pytest.raises(AgentStopped):
        rig.dev.wait_online([0], timeout=5)


# -- interrupts ----------------------------------------------------------------------------------------
def test_irq_reports_collected_per_vcpu(rig):
    dev = rig.dev
    t0 = time.monotonic()

    def guest():
        for cpu, intid in ((0, 8192), (1, 8193), (0, 27 + 8192), (1, 8192)):
            time.sleep(0.01)
            rig.mailbox.mmio_write(cpu, A.MB_IRQ, 4, intid)

    t = threading.Thread(target=guest)
    t.start()
    got = dev.wait_irqs(2, timeout=5, intid=8192)
    t.join()
    assert [(c, i) for c, i, _ in got] == [(0, 8192), (1, 8192)]
    assert all(t0 <= ts <= time.monotonic() for _, _, ts in got)
    assert [(c, i) for c, i, _ in dev.wait_irqs(1, timeout=1, cpu=1)] == [(1, 8193)]
    rest = dev.take_irqs()
    assert [(c, i) for c, i, _ in rest] == [(0, 8219)]
    assert dev.take_irqs() == []


def test_wait_irqs_timeout_carries_what_came(rig):
    rig.mailbox.mmio_write(2, A.MB_IRQ, 4, 8200)
    with pytest.raises(AgentTimeout, match="1 of 2 interrupt report") as e:
        rig.dev.wait_irqs(2, timeout=0.1, intid=8200)
    assert [(c, i) for c, i, _ in e.value.irqs] == [(2, 8200)]


# -- panics and bad input --------------------------------------------------------------------------------
def test_panic_fails_the_request_and_reaches_the_machine(rig):
    seen = []
    rig.mailbox.on_panic = seen.append
    req = rig.dev.post(1, Op.READ, 0x4000_0000, 8)
    assert rig.mailbox.mmio_read(1, A.MB_REQ, 8) == Op.READ
    # the agent's panic(): FAR, ELR, kind, then the ESR
    rig.mailbox.mmio_write(1, A.MB_PANIC_FAR, 8, 0x1234)
    rig.mailbox.mmio_write(1, A.MB_PANIC_ELR, 8, 0x4008_0100)
    rig.mailbox.mmio_write(1, A.MB_PANIC_KIND, 8, 4)
    rig.mailbox.mmio_write(1, A.MB_PANIC, 8, 0x9600_0010)
    with pytest.raises(AgentPanic, match=r"vCPU 1 panicked: unexpected synchronous \(EL1h\) exception, ESR "
                                         r"0x96000010 \(EC 0x25: data abort\), FAR 0x1234, ELR 0x40080100"):
        req.wait(1)
    assert len(seen) == 1 and seen[0].elr == 0x4008_0100
    with pytest.raises(AgentPanic):
        rig.dev.post(1, Op.PING)
    with pytest.raises(AgentPanic):
        rig.dev.wait_online([1], timeout=1)
    with pytest.raises(AgentPanic):
        rig.dev.check()
    assert rig.dev.panics == seen


def test_agent_detected_panics_are_explained(rig):
    rig.mailbox.mmio_write(0, A.MB_PANIC_KIND, 8, A.PANIC_KIND_NO_SYSREG_GIC)
    rig.mailbox.mmio_write(0, A.MB_PANIC, 8, 0)
    rig.mailbox.mmio_write(5, A.MB_PANIC_KIND, 8, A.PANIC_KIND_BAD_CPU)
    rig.mailbox.mmio_write(5, A.MB_PANIC, 8, 0x8000_0040)
    msgs = [str(p) for p in rig.dev.panics]
    assert "no GICv3 system register interface" in msgs[0]
    assert "MPIDR_EL1 0x80000040" in msgs[1]


def test_on_panic_failure_does_not_escape_the_vcpu_thread(rig, caplog):
    def boom(exc):
        raise RuntimeError("machine bug")

    rig.mailbox.on_panic = boom
    rig.mailbox.mmio_write(0, A.MB_PANIC, 8, 0)
    assert "on_panic callback failed" in caplog.text


def test_bad_accesses_never_raise_and_are_counted_and_logged_once(rig, caplog):
    dev = rig.mailbox
    caplog.set_level(logging.WARNING, logger="kvmits.machine.devices.agent_mailbox")
    reads = [(A.MB_REQ, 4), (A.MB_REQ + 4, 8), (0x1F8, 8), (0xFFF, 1), (A.MB_ARG0, 8), (A.MB_ARG0, 8),
             (A.MB_RESULT, 8)]
    assert [dev.mmio_read(0, off, size) for off, size in reads] == [0] * len(reads)
    writes = [(A.MB_IRQ, 8, 1), (A.MB_RESULT, 8, 5), (A.MB_ERROR, 8, 1), (A.MB_REQ, 8, 1), (0x800, 2, 3),
              (A.MB_HELLO, 4, 0)]
    for off, size, value in writes:
        dev.mmio_write(0, off, size, value)
    assert dev.bad_accesses == len(reads) + len(writes)
    # ARG0 (8 bytes) was read twice: logged once
    assert caplog.text.count("offset 0x8:") == 1
    assert dev.take_irqs() == [] and dev.online() == []


# -- the guest program builds ------------------------------------------------------------------------------
def _toolchain_prefix() -> str | None:
    prefix = "" if platform.machine() in ("aarch64", "arm64") else "aarch64-linux-gnu-"
    return prefix if shutil.which(prefix + "gcc") and shutil.which(prefix + "nm") else None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    prefix = _toolchain_prefix()
    if prefix is None or shutil.which("make") is None:
        pytest.skip("no arm64 C compiler (Debian: gcc-aarch64-linux-gnu on x86_64, gcc on arm64) or no make")
    out = tmp_path_factory.mktemp("guests")
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests"), f"B={out}"], check=True, capture_output=True)
    return prefix, out


def test_make_without_a_compiler_names_the_package(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make on this host")
    r = subprocess.run(["make", "-C", str(ROOT / "guests"), f"B={tmp_path}", "CROSS_COMPILE=no-such-prefix-"],
                       check=False, capture_output=True, text=True)
    assert r.returncode != 0
    assert "no-such-prefix-gcc not found" in r.stderr and "apt-get install gcc-aarch64-linux-gnu" in r.stderr


def test_agent_image_layout(built):
    prefix, out = built
    elf = (out / "agent.elf").read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2                      # ELF64
    (machine,) = struct.unpack_from("<H", elf, 18)
    (entry,) = struct.unpack_from("<Q", elf, 24)
    assert machine == 183 and entry == A.AGENT_LOAD_ADDR              # EM_AARCH64, raw loader address
    syms = {}
    for line in subprocess.run([prefix + "nm", str(out / "agent.elf")], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    assert syms["_start"] == A.AGENT_LOAD_ADDR
    assert syms["_end"] <= A.AGENT_RAM_END
    assert syms["agent_vectors"] % 2048 == 0 and syms["agent_idmap"] % 4096 == 0
    assert syms["__bss_end"] - syms["agent_stacks"] >= A.AGENT_MAX_CPUS << A.AGENT_STACK_SHIFT
    bin_ = (out / "agent.bin").read_bytes()
    assert len(bin_) == syms["__bss_start"] - A.AGENT_LOAD_ADDR       # BSS is not in the file
    (first,) = struct.unpack_from("<I", bin_, 0)
    assert first == 0xD5034FDF                                         # msr daifset, #0xf
    # the identity map: RAM Normal write-back, MMIO Device
    idmap = syms["agent_idmap"] - A.AGENT_LOAD_ADDR
    blocks = struct.unpack_from("<512Q", bin_, idmap)
    assert blocks[0] & 0x1C == 0 and blocks[1] & 0x1C == 4 and blocks[1] >> 30 & 0x3FFFF == 1
    assert all(b & 0x403 == 0x401 for b in blocks)                     # block descriptors, AF set


def test_hello_image(built):
    _prefix, out = built
    data = (out / "hello.bin").read_bytes()
    assert 0 < len(data) < 4096 and b"kvmits hello" in data
