"""The host side of the guest agent: typed requests performed by a guest vCPU.

    agent = machine.agent                    # Agent, over the mailbox on the bus at MAILBOX_BASE
    agent.wait_online([0])                   # the boot CPU said HELLO
    agent.start_cpus(4)                      # PSCI CPU_ON for vCPUs 1..3, wait for their HELLO
    typer = agent.read(0, GICD_BASE + 0x4, 4)
    agent.irq_mode(2, IrqMode.COUNT, table_gpa, 64)
    irqs = agent.wait_irqs(1, intid=8192)    # [(cpu, 8192, t)]
    agent.system_off()

Every request is one post() to the mailbox (kvmits.machine.devices.agent_mailbox) and a wait on
its Request; the reports (HELLO, interrupts, panics) are the mailbox's, passed through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvmits.machine.agent.protocol import (
    DEFAULT_TIMEOUT, PSCI_RETURN, AgentError, AgentPanic, AgentTimeout, IrqMode, Op, SysReg, kvm_default_mpidr,
    signed64,
)
from kvmits.machine.devices.agent_mailbox import AgentMailbox, Request


class Agent:
    """The requests a host can make of the agent on each vCPU, over one AgentMailbox."""

    def __init__(self, mailbox: AgentMailbox):
        self.mailbox = mailbox

    def post(self, cpu: int, op: int, *args: int) -> Request:
        """Queue a raw request for vCPU `cpu` (AgentMailbox.post)."""
        return self.mailbox.post(cpu, op, *args)

    def call(self, cpu: int, op: int, *args: int, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Post a request to vCPU `cpu` and wait for its result (AgentTimeout, AgentRequestFailed,
        AgentPanic, AgentStopped otherwise)."""
        try:
            return self.mailbox.post(cpu, op, *args).wait(timeout)
        except AgentTimeout as exc:
            if self.mailbox.describe_cpu is not None:
                exc.add_note(f"vCPU {cpu} at the timeout: {self.mailbox.describe_cpu(cpu)}")
            raise

    def client(self, cpu: int, timeout: float | None = DEFAULT_TIMEOUT) -> AgentClient:
        """Loads and stores performed by vCPU `cpu` (kvmits.lab.guest_driver.GuestAccess), each
        allowed `timeout` s (a GITS_CWRITER store returns when the kernel's ITS has run the batch)."""
        return AgentClient(self, cpu, timeout)

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
        return signed64(self.call(cpu, Op.CPU_ON, target_mpidr, timeout=timeout))

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
        self.mailbox.wait_online(targets, timeout)

    def system_off(self, cpu: int = 0) -> Request:
        """PSCI SYSTEM_OFF from vCPU `cpu`: the VM ends (the machine sees it); nothing to wait for."""
        return self.mailbox.post(cpu, Op.SYSTEM_OFF)

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

    # -- what the guest reported (the mailbox's state) --------------------------------------------
    def wait_online(self, cpus: int | Iterable[int], timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.mailbox.wait_online(cpus, timeout)

    def online(self) -> list[int]:
        return self.mailbox.online()

    def mpidr(self, cpu: int) -> int | None:
        return self.mailbox.mpidr(cpu)

    @property
    def panics(self) -> list[AgentPanic]:
        return self.mailbox.panics

    def check(self) -> None:
        self.mailbox.check()

    def take_irqs(self) -> list[tuple[int, int, float]]:
        return self.mailbox.take_irqs()

    def wait_irqs(self, count: int = 1, timeout: float | None = DEFAULT_TIMEOUT, *, cpu: int | None = None,
                  intid: int | None = None) -> list[tuple[int, int, float]]:
        return self.mailbox.wait_irqs(count, timeout, cpu=cpu, intid=intid)

    def stop(self, reason: BaseException | str = "stopped") -> None:
        self.mailbox.stop(reason)


class AgentClient:
    """The loads and stores of one vCPU through the agent: kvmits.lab.guest_driver.GuestAccess."""

    __slots__ = ("agent", "cpu", "timeout")

    def __init__(self, agent: Agent, cpu: int, timeout: float | None = DEFAULT_TIMEOUT):
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
