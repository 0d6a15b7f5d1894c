"""Save and restore of the PL011's and the agent mailbox's state (issue 13): a round trip through
JSON gives the destination device what the guest sees on the source, and a malformed state is
refused field by field without touching the device."""

from __future__ import annotations

import copy
import io
import json
import threading
import time

import pytest

from kvmits.errors import KvmitsError
from kvmits.machine import agent as A
from kvmits.machine.agent import AgentError, AgentMailbox, AgentProtocolError, AgentTimeout, Op
from kvmits.machine.devices import agent_mailbox as M
from kvmits.machine.devices import pl011 as P

GICD = 0x0800_0000


def through_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


# -- PL011 -----------------------------------------------------------------------------------------------
def uart():
    lines = []
    return P.Pl011(io.BytesIO(), irq=lines.append), lines


#: every register a guest reads without side effects (UARTDR pops the RX queue: read separately)
VISIBLE = (P.UARTFR, P.UARTILPR, P.UARTIBRD, P.UARTFBRD, P.UARTLCR_H, P.UARTCR, P.UARTIFLS, P.UARTIMSC, P.UARTRIS,
           P.UARTMIS, P.UARTDMACR)


def registers(u: P.Pl011) -> dict[int, int]:
    return {off: u.mmio_read(0, off, 4) for off in VISIBLE}


def drain(u: P.Pl011) -> bytes:
    out = bytearray()
    while not u.mmio_read(0, P.UARTFR, 4) & P.FR_RXFE:
        out.append(u.mmio_read(0, P.UARTDR, 4))
    return bytes(out)


def programmed_uart():
    """A UART as Linux leaves it mid-session: baud, line control, FIFO levels, DMA bits set,
    one byte transmitted (TXRIS latched), 20 bytes of typeahead waiting (more than the FIFO)."""
    u, lines = uart()
    for off, value in ((P.UARTIBRD, 0x1A), (P.UARTFBRD, 0x3), (P.UARTLCR_H, 0x70), (P.UARTCR, 0x301),
                       (P.UARTIFLS, 0x24), (P.UARTDMACR, 0x5), (P.UARTILPR, 0x9)):
        u.mmio_write(0, off, 4, value)
    u.mmio_write(0, P.UARTDR, 4, ord("$"))
    u.feed(b"typed ahead, unread!")
    u.mmio_write(0, 0x800, 4, 1)                  # one bad access
    return u, lines


def test_pl011_round_trip_with_the_interrupt_pending():
    src, src_lines = programmed_uart()
    src.mmio_write(0, P.UARTIMSC, 4, P.INT_TX | P.INT_RX | P.INT_RT)
    assert src_lines == [1]
    want = registers(src)
    assert want[P.UARTMIS] == P.INT_TX | P.INT_RX
    state = through_json(src.save_state())
    assert state["format"] == "kvmits-pl011" and state["version"] == 1

    dst, lines = uart()
    dst.load_state(state)
    assert lines == [1]                           # pending at save: pending after restore
    assert registers(dst) == want
    assert dst.tx_count == 1 and dst.bad_accesses == 1     # host statistics are carried
    assert drain(dst) == b"typed ahead, unread!"
    assert lines == [1]                           # TXRIS still holds the line
    dst.mmio_write(0, P.UARTICR, 4, P.INT_TX)
    assert lines == [1, 0]
    assert drain(src) == b"typed ahead, unread!"  # saving took nothing from the source


def test_pl011_round_trip_with_the_interrupt_masked_reports_nothing():
    src, _ = programmed_uart()                    # TXRIS and RXRIS raw, IMSC 0
    want = registers(src)
    assert want[P.UARTRIS] == P.INT_TX | P.INT_RX and want[P.UARTMIS] == 0
    dst, lines = uart()
    dst.load_state(through_json(src.save_state()))
    assert lines == []
    assert registers(dst) == want
    dst.mmio_write(0, P.UARTIMSC, 4, P.INT_RX)    # unmasking it raises the line, as on the source
    assert lines == [1]
    assert drain(dst) == b"typed ahead, unread!" and lines == [1, 0]


def test_pl011_rx_interrupt_alone_survives():
    src, src_lines = uart()
    src.mmio_write(0, P.UARTIMSC, 4, P.INT_RX)
    src.feed(b"k")
    assert src_lines == [1]
    dst, lines = uart()
    dst.load_state(through_json(src.save_state()))
    assert lines == [1] and dst.mmio_read(0, P.UARTMIS, 4) == P.INT_RX
    assert dst.mmio_read(0, P.UARTDR, 4) == ord("k") and lines == [1, 0]


def test_pl011_reset_state_round_trips():
    src, _ = uart()
    dst, lines = uart()
    dst.load_state(through_json(src.save_state()))
    assert registers(dst) == registers(src) and lines == []
    assert dst.rx_pending() == 0 and dst.tx_count == 0


def test_pl011_save_refuses_more_rx_than_a_state_carries(monkeypatch):
    monkeypatch.setattr(P, "RX_STATE_MAX", 4)
    u, _ = uart()
    u.feed(b"12345")
    with pytest.raises(ValueError, match="5 unread RX bytes"):
        u.save_state()


def _set(path, value):
    """A mutation of a state: the field at `path` (keys / indices) set to `value`."""
    def mutate(state):
        d = state
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(state):
        d = state
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return mutate


BAD_PL011 = [
    (_set(("format",), "kvmits-gic"), "format"),
    (_delete(("format",)), "format"),
    (_set(("version",), 2), "version"),
    (_set(("version",), "1"), "version"),
    (_set(("version",), True), "version"),
    (_delete(("imsc",)), "imsc missing"),
    (_set(("extra",), 1), "unknown field.*extra"),
    (_set(("regs",), [1, 2]), "regs must be a dict"),
    (_delete(("regs", "UARTCR")), "regs must hold exactly.*UARTCR"),
    (_set(("regs", "UARTPeriphID0"), 0x11), "regs must hold exactly.*UARTPeriphID0"),
    (_set(("regs", "UARTIBRD"), 0x10000), "regs.UARTIBRD = 0x10000 sets bits outside 0xffff"),
    (_set(("regs", "UARTCR"), 0x8), "regs.UARTCR = 0x8 sets bits outside"),
    (_set(("regs", "UARTLCR_H"), -1), "regs.UARTLCR_H = -0x1 is out of range"),
    (_set(("regs", "UARTFBRD"), True), "regs.UARTFBRD must be an integer"),
    (_set(("regs", "UARTIFLS"), "0x12"), "regs.UARTIFLS must be an integer"),
    (_set(("imsc",), 0x800), "imsc = 0x800 sets bits outside 0x7ff"),
    (_set(("imsc",), 1.0), "imsc must be an integer"),
    (_set(("ris",), P.INT_RX), "ris = 0x10 sets bits outside 0x20"),      # RXRIS is the queue's, not latched
    (_set(("ris",), 1 << 40), "ris = .* out of range"),
    (_set(("rx",), [0x61]), "rx must be a string"),
    (_set(("rx",), "616"), "rx must be a string of hex digit pairs"),
    (_set(("rx",), "zz"), "rx must be a string of hex digit pairs"),
    (_set(("rx",), "61 62"), "rx must be a string of hex digit pairs"),
    (_set(("rx",), "00" * (P.RX_STATE_MAX + 1)), f"rx holds {P.RX_STATE_MAX + 1} bytes"),
    (_set(("tx_count",), -1), "tx_count = -0x1 is out of range"),
    (_set(("tx_count",), 1 << 64), "tx_count = .* out of range"),
    (_set(("bad_accesses",), None), "bad_accesses must be an integer"),
]


@pytest.mark.parametrize("mutate, match", BAD_PL011)
def test_pl011_malformed_state_is_refused_and_changes_nothing(mutate, match):
    src, _ = programmed_uart()
    src.mmio_write(0, P.UARTIMSC, 4, P.INT_TX)
    state = through_json(src.save_state())
    mutate(state)
    dst, lines = uart()
    dst.mmio_write(0, P.UARTIBRD, 4, 0x77)        # some state of its own, to see it kept
    dst.feed(b"mine")
    before = dst.save_state()
    with pytest.raises(ValueError, match=match):
        dst.load_state(state)
    assert dst.save_state() == before and lines == []


@pytest.mark.parametrize("state", [None, [], "kvmits-pl011"])
def test_pl011_state_must_be_a_dict(state):
    dst, _ = uart()
    with pytest.raises(ValueError, match="PL011 state must be a dict"):
        dst.load_state(state)


# -- the agent's mailbox ---------------------------------------------------------------------------------
def mailbox() -> AgentMailbox:
    return AgentMailbox(GICD)


def hello(mb: AgentMailbox, cpu: int, version: int = A.AGENT_VERSION) -> int:
    """What the agent does when its vCPU comes online (guests/agent/agent.c)."""
    mpidr = 0x8000_0000 | A.kvm_default_mpidr(cpu)
    mb.mmio_write(cpu, A.MB_VERSION, 8, version)
    mb.mmio_write(cpu, A.MB_HELLO, 8, mpidr)
    return mpidr


REPORTS = [(0, 8192), (1, 8193), (0, 27), (1, 8192), (0, 8192)]


def busy_source() -> AgentMailbox:
    """vCPUs 0 and 1 online, vCPU 2 known to the host but never online, interrupt reports not yet
    taken (interleaved), one bad access, and vCPU 1 halfway through writing its panic registers."""
    mb = mailbox()
    hello(mb, 0)
    hello(mb, 1)
    assert mb.mpidr(2) is None                    # creates vCPU 2's slot
    for cpu, intid in REPORTS:
        mb.mmio_write(cpu, A.MB_IRQ, 4, intid)
        time.sleep(0.002)
    mb.mmio_read(0, A.MB_ARG0, 8)                 # no request in progress: a bad access
    mb.mmio_write(1, A.MB_PANIC_FAR, 8, 0x1234)
    mb.mmio_write(1, A.MB_PANIC_ELR, 8, 0x4008_0100)
    return mb


def guest_view(mb: AgentMailbox):
    """Everything load_state sets, exactly (the reports with their re-based times)."""
    return ([(s.mpidr, s.online, s.version, s.hello_time, list(s.panic_regs)) for s in mb._cpus], list(mb._irqs),
            mb.bad_accesses)


def test_mailbox_round_trip():
    src = busy_source()
    src_irqs = list(src._irqs)
    state = through_json(src.save_state())
    assert state["format"] == "kvmits-agent-mailbox" and state["version"] == 1
    assert "gicd_base" not in json.dumps(state) and "idle_us" not in json.dumps(state)

    dst = mailbox()
    t0 = time.monotonic()
    dst.load_state(state)
    t1 = time.monotonic()
    assert dst.online() == src.online() == [0, 1]
    assert [dst.mpidr(c) for c in range(3)] == [src.mpidr(c) for c in range(3)]
    assert [s.version for s in dst._cpus] == [A.AGENT_VERSION, A.AGENT_VERSION, None]
    assert dst.bad_accesses == src.bad_accesses == 1
    start = time.monotonic()
    dst.wait_online(2, timeout=0)                 # at once: no wait at all
    assert time.monotonic() - start < 0.5
    with pytest.raises(AgentTimeout, match=r"vCPU\(s\) \[2\]"):
        dst.wait_online(3, timeout=0)             # vCPU 2 was not online on the source either

    # the reports: same order, times re-based to this clock with the same spacing
    irqs = dst.take_irqs()
    assert [(c, i) for c, i, _ in irqs] == REPORTS
    times = [t for _, _, t in irqs]
    assert times == sorted(times) and times[-1] <= t1
    for (_, _, a), (_, _, b), (_, _, sa), (_, _, sb) in zip(irqs, irqs[1:], src_irqs, src_irqs[1:]):
        assert b - a == pytest.approx(sb - sa, abs=1e-6)
    assert times[0] < t0 - (src_irqs[-1][2] - src_irqs[0][2]) + 1e-3

    # the panic registers written before the save complete the panic the guest raises after it
    dst.mmio_write(1, A.MB_PANIC_KIND, 8, 4)
    dst.mmio_write(1, A.MB_PANIC, 8, 0x9600_0010)
    assert dst.panics[0].far == 0x1234 and dst.panics[0].elr == 0x4008_0100


def test_mailbox_restored_reports_are_found_by_wait_irqs():
    src = busy_source()
    dst = mailbox()
    dst.load_state(through_json(src.save_state()))
    got = dst.wait_irqs(2, timeout=0, intid=8192, cpu=0)
    assert [(c, i) for c, i, _ in got] == [(0, 8192), (0, 8192)]
    assert [(c, i) for c, i, _ in dst.wait_irqs(1, timeout=0, cpu=1, intid=8193)] == [(1, 8193)]
    assert [(c, i) for c, i, _ in dst.take_irqs()] == [(0, 27), (1, 8192)]


def test_mailbox_load_wakes_a_waiter():
    src = busy_source()
    state = through_json(src.save_state())
    dst = mailbox()
    result = []
    waiter = threading.Thread(target=lambda: result.append(dst.wait_online(2, timeout=5) or "online"))
    waiter.start()
    time.sleep(0.05)
    start = time.monotonic()
    dst.load_state(state)
    waiter.join(5)
    assert result == ["online"] and time.monotonic() - start < 2


def test_mailbox_version_mismatch_travels():
    src = mailbox()
    hello(src, 0, version=A.AGENT_VERSION + 1)
    dst = mailbox()
    dst.load_state(through_json(src.save_state()))
    with pytest.raises(AgentProtocolError, match="vCPU 0 speaks mailbox protocol version"):
        dst.wait_online(1, timeout=0)


def test_mailbox_fresh_state_round_trips_and_resets_extra_slots():
    dst = mailbox()
    hello(dst, 3)                                  # a slot the (empty) state does not have
    dst.load_state(through_json(mailbox().save_state()))
    assert dst.online() == [] and dst.mpidr(3) is None


def test_mailbox_refuses_to_save_with_a_request_queued():
    mb = mailbox()
    hello(mb, 0)
    req = mb.post(0, Op.PING, 5)
    assert mb.busy() == ["vCPU 0: PING(0x5) (queued)"]
    with pytest.raises(M.MailboxStateError, match=r"requests are outstanding: vCPU 0: PING\(0x5\) \(queued\)"):
        mb.save_state()
    # the guest serves it: the mailbox is idle again and saves
    assert mb.mmio_read(0, A.MB_REQ, 8) == Op.PING
    mb.mmio_write(0, A.MB_RESULT, 8, mb.mmio_read(0, A.MB_ARG0, 8))
    assert req.wait(1) == 5
    assert mb.busy() == []
    assert mb.save_state()["cpus"][0]["online"] is True


def test_mailbox_refuses_to_save_with_a_request_running():
    mb = mailbox()
    hello(mb, 0)
    hello(mb, 1)
    mb.post(1, Op.READ, 0x4000_0000, 8)
    mb.post(1, Op.PING, 7)
    assert mb.mmio_read(1, A.MB_REQ, 8) == Op.READ            # the guest took the first one
    assert mb.busy() == ["vCPU 1: READ(0x40000000, 0x8) (running)", "vCPU 1: PING(0x7) (queued)"]
    with pytest.raises(M.MailboxStateError, match=r"vCPU 1: READ\(0x40000000, 0x8\) \(running\); vCPU 1: PING"):
        mb.save_state()


def test_mailbox_a_running_request_whose_wait_timed_out_still_blocks_the_save():
    mb = mailbox()
    hello(mb, 0)
    req = mb.post(0, Op.PING, 1)
    assert mb.mmio_read(0, A.MB_REQ, 8) == Op.PING
    with pytest.raises(AgentTimeout):
        req.wait(0)
    assert mb.busy() == ["vCPU 0: PING(0x1) (running, its host wait timed out)"]
    with pytest.raises(M.MailboxStateError, match="its host wait timed out"):
        mb.save_state()
    mb.mmio_write(0, A.MB_RESULT, 8, 1)                       # the late answer frees the guest
    assert mb.busy() == []
    mb.save_state()


def test_mailbox_refuses_to_save_after_a_panic():
    mb = mailbox()
    hello(mb, 0)
    hello(mb, 1)
    mb.mmio_write(1, A.MB_PANIC_KIND, 8, A.PANIC_KIND_NO_SYSREG_GIC)
    mb.mmio_write(1, A.MB_PANIC, 8, 0)
    with pytest.raises(M.MailboxStateError, match=r"cannot be saved: agent on vCPU 1 panicked: ICC_SRE_EL1") as e:
        mb.save_state()
    assert isinstance(e.value, AgentError) and isinstance(e.value, KvmitsError)


def test_mailbox_save_refuses_more_reports_than_a_state_carries(monkeypatch):
    monkeypatch.setattr(M, "IRQS_STATE_MAX", 2)
    mb = mailbox()
    for intid in (1, 2, 3):
        mb.mmio_write(0, A.MB_IRQ, 4, intid)
    with pytest.raises(M.MailboxStateError, match="3 interrupt reports.*take_irqs"):
        mb.save_state()


BAD_MAILBOX = [
    (_set(("format",), "kvmits-pl011"), "format"),
    (_delete(("format",)), "format"),
    (_set(("version",), 2), "version"),
    (_set(("version",), 1.0), "version"),
    (_delete(("irqs",)), "irqs missing"),
    (_set(("gicd_base",), GICD), "unknown field.*gicd_base"),
    (_set(("cpus",), {"0": {}}), "cpus must be a list"),
    (_set(("cpus", 0), "online"), r"cpus\[0\] must be a dict"),
    (_delete(("cpus", 1, "online")), r"cpus\[1\]: field.*online missing"),
    (_set(("cpus", 1, "panic"), None), r"cpus\[1\]: unknown field.*panic"),
    (_set(("cpus", 0, "mpidr"), -1), r"cpus\[0\].mpidr = -0x1 is out of range"),
    (_set(("cpus", 0, "mpidr"), 1 << 64), r"cpus\[0\].mpidr = .* out of range"),
    (_set(("cpus", 0, "mpidr"), "0x80000000"), r"cpus\[0\].mpidr must be an integer"),
    (_set(("cpus", 0, "online"), 1), r"cpus\[0\].online must be a bool"),
    (_set(("cpus", 0, "online"), False), r"cpus\[0\].online is False but cpus\[0\].mpidr is"),
    (_set(("cpus", 2, "online"), True), r"cpus\[2\].online is True but cpus\[2\].mpidr is None"),
    (_set(("cpus", 0, "version"), True), r"cpus\[0\].version must be an integer"),
    (_set(("cpus", 0, "version"), -2), r"cpus\[0\].version = .* out of range"),
    (_set(("cpus", 0, "hello_age_ns"), None), r"cpus\[0\].hello_age_ns is missing for an online vCPU"),
    (_set(("cpus", 0, "hello_age_ns"), -5), r"cpus\[0\].hello_age_ns = .* out of range"),
    (_set(("cpus", 0, "hello_age_ns"), 0.5), r"cpus\[0\].hello_age_ns must be an integer"),
    (_set(("cpus", 2, "hello_age_ns"), 0), r"cpus\[2\].hello_age_ns is set for a vCPU that is not online"),
    (_set(("cpus", 1, "panic_regs"), [0, 0]), r"cpus\[1\].panic_regs must be a list of 3"),
    (_set(("cpus", 1, "panic_regs"), "000"), r"cpus\[1\].panic_regs must be a list of 3"),
    (_set(("cpus", 1, "panic_regs", 2), 1 << 64), r"cpus\[1\].panic_regs\[2\] = .* out of range"),
    (_set(("cpus",), [{}] * (M.MAX_CPUS + 1)), f"cpus has {M.MAX_CPUS + 1} entries"),
    (_set(("irqs",), "none"), "irqs must be a list"),
    (_set(("irqs", 1), [1, 8193]), r"irqs\[1\] must be a list \[cpu, intid, age_ns\]"),
    (_set(("irqs", 1), {"cpu": 1}), r"irqs\[1\] must be a list"),
    (_set(("irqs", 1, 0), 1 << 16), r"irqs\[1\] cpu = 0x10000 is out of range"),
    (_set(("irqs", 1, 1), 1 << 32), r"irqs\[1\] intid = 0x100000000 is out of range"),
    (_set(("irqs", 1, 1), None), r"irqs\[1\] intid must be an integer"),
    (_set(("irqs", 1, 2), -1), r"irqs\[1\] age_ns = -0x1 is out of range"),
    (_set(("irqs", 1, 2), 1.5), r"irqs\[1\] age_ns must be an integer"),
    (_set(("irqs", 1, 2), 1 << 62), r"irqs\[1\] is older than irqs\[0\]"),
    (_set(("bad_accesses",), -1), "bad_accesses = -0x1 is out of range"),
    (_set(("bad_accesses",), "1"), "bad_accesses must be an integer"),
]


@pytest.mark.parametrize("mutate, match", BAD_MAILBOX)
def test_mailbox_malformed_state_is_refused_and_changes_nothing(mutate, match):
    state = through_json(busy_source().save_state())
    mutate(state)
    dst = mailbox()
    hello(dst, 0)                                 # some state of its own, to see it kept
    dst.mmio_write(0, A.MB_IRQ, 4, 99)
    before = guest_view(dst)
    with pytest.raises(ValueError, match=match):
        dst.load_state(state)
    assert guest_view(dst) == before


def test_mailbox_too_many_reports_in_a_state_are_refused(monkeypatch):
    state = through_json(busy_source().save_state())
    monkeypatch.setattr(M, "IRQS_STATE_MAX", len(state["irqs"]) - 1)
    dst = mailbox()
    with pytest.raises(ValueError, match=f"irqs has {len(state['irqs'])} reports"):
        dst.load_state(state)
    assert dst.take_irqs() == []


@pytest.mark.parametrize("state", [None, [], "kvmits-agent-mailbox"])
def test_mailbox_state_must_be_a_dict(state):
    with pytest.raises(ValueError, match="agent mailbox state must be a dict"):
        mailbox().load_state(state)


def test_a_state_is_not_shared_with_the_device():
    """save_state returns copies: editing the dict later does not reach into either device."""
    src = busy_source()
    state = src.save_state()
    kept = copy.deepcopy(state)
    dst = mailbox()
    dst.load_state(state)
    state["cpus"][1]["panic_regs"][0] = 0xBAD
    assert src._cpus[1].panic_regs[0] == dst._cpus[1].panic_regs[0] == 0x1234
    assert kept["cpus"][1]["panic_regs"][0] == 0x1234
