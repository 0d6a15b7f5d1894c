"""The command queue: wrap-around, the command budget, both error policies, read faults."""

from dataclasses import replace

from kvmits.its import ErrorPolicy, ItsConfig, RecordingSink
from kvmits.its import commands as C
from kvmits.its import registers as R
from tests.its.ramfake import QUEUE, RAM_BASE, RAM_SIZE, Harness, itt

STALL = ItsConfig(error_policy=ErrorPolicy.STALL)


def test_queue_wraps_around():
    h = Harness(queue_pages=1)                  # 128 commands
    h.run(*[C.encode_sync()] * 120)
    assert h.its.creadr == 120 * 32
    # 16 commands: 8 to the end of the queue, 8 from its start
    cmds = [C.encode_mapc(n, n % 4) for n in range(16)]
    assert h.run(*cmds) == []
    assert h.its.creadr == 8 * 32 and h.its.cwriter == 8 * 32
    assert h.its.dump()["collections"] == {n: n % 4 for n in range(16)}
    assert [r.offset for r in h.records[-16:]] == [0xF00 + 32 * n for n in range(8)] + [
        32 * n for n in range(8)]


def test_cwriter_may_point_at_the_last_slot_and_wrap_to_zero():
    h = Harness(queue_pages=1)
    h.ram.poke(QUEUE, C.encode_sync() * 128)
    h.its.mmio_write(R.GITS_CWRITER, 8, 0xFE0)
    assert h.its.creadr == 0xFE0
    h.its.mmio_write(R.GITS_CWRITER, 8, 0)
    assert h.its.creadr == 0 and h.its.commands_processed == 128


def test_command_budget_bounds_work_per_cwriter_write():
    h = Harness(ItsConfig(command_budget=4))
    cmds = [C.encode_mapc(n, 0) for n in range(10)]
    h.enqueue(*cmds)
    assert h.its.creadr == 4 * 32 and h.its.pending_commands == 6
    assert h.its.process_commands(budget=1) == 1 and h.its.creadr == 5 * 32
    assert h.its.process_commands() == 4
    # a guest polling GITS_CREADR for completion drives the rest
    assert h.its.mmio_read(R.GITS_CREADR, 8) == 10 * 32
    assert h.its.pending_commands == 0 and len(h.its.dump()["collections"]) == 10


def test_polling_ctlr_also_drains_and_reports_quiescent():
    h = Harness(ItsConfig(command_budget=2))
    h.enqueue(*[C.encode_sync()] * 5)
    assert h.its.pending_commands == 3
    reads = [h.its.mmio_read(R.GITS_CTLR, 4) for _ in range(3)]
    assert reads == [1, 0x8000_0001, 0x8000_0001]


def test_ignore_policy_skips_erroneous_commands():
    h = Harness()
    assert h.run(C.encode_int(1, 0), C.encode_mapc(0, 1)) == [C.E_ITS_INT_UNMAPPED_DEVICE]
    assert h.its.creadr == 64 and not h.its.stalled
    assert h.its.mmio_read(R.GITS_CREADR, 8) & 1 == 0


def test_stall_policy_stops_in_front_of_the_error_and_retry_resumes():
    h = Harness(STALL)
    errors = h.run(C.encode_mapc(0, 1), C.encode_int(1, 0), C.encode_mapc(1, 1))
    assert errors == [C.E_ITS_INT_UNMAPPED_DEVICE]
    assert h.its.stalled and h.its.mmio_read(R.GITS_CREADR, 8) == 32 | 1
    assert h.its.dump()["collections"] == {0: 1}
    assert h.records[-1].stalled
    # more commands queue up behind the stall; without Retry nothing runs
    h.enqueue(C.encode_mapc(2, 1))
    assert h.its.mmio_read(R.GITS_CREADR, 8) == 32 | 1 and h.its.cwriter == 128
    assert h.its.process_commands() == 0
    # Retry with the command still wrong: executed again, stalls again
    h.its.mmio_write(R.GITS_CWRITER, 8, 128 | 1)
    assert h.its.mmio_read(R.GITS_CREADR, 8) == 32 | 1
    assert h.its.error_counts[C.E_ITS_INT_UNMAPPED_DEVICE] == 2
    # software fixes the command (rewrites it as a SYNC) and retries
    h.ram.poke(QUEUE + 32, C.encode_sync())
    h.its.mmio_write(R.GITS_CWRITER + 4, 4, 0)          # upper half: no Retry, still stalled
    assert h.its.stalled
    h.its.mmio_write(R.GITS_CWRITER, 4, 128 | 1)
    assert h.its.mmio_read(R.GITS_CREADR, 8) == 128
    assert h.its.dump()["collections"] == {0: 1, 1: 1, 2: 1}


def test_retry_without_a_stall_has_no_effect():
    h = Harness(STALL)
    h.run(C.encode_sync())
    h.its.mmio_write(R.GITS_CWRITER, 8, 32 | 1)
    assert h.its.creadr == 32 and h.its.commands_processed == 1


def test_cbaser_write_clears_a_stall():
    h = Harness(STALL)
    h.run(C.encode_int(1, 0))
    assert h.its.stalled
    h.its.mmio_write(R.GITS_CTLR, 4, 0)
    h.its.mmio_write(R.GITS_CBASER, 8, R.encode_cbaser(base=QUEUE, pages=1))
    assert not h.its.stalled and h.its.mmio_read(R.GITS_CREADR, 8) == 0
    h.its.mmio_write(R.GITS_CTLR, 4, 1)
    assert h.run(C.encode_mapc(0, 0)) == []


RAM_END = RAM_BASE + RAM_SIZE


def _queue_at_ram_end(config=None):
    """A 17-page queue on the last 64 KiB of RAM: its 17th page is outside guest RAM."""
    config = replace(config or ItsConfig(), command_budget=4096)
    h = Harness(config, queue_pages=17, queue_base=RAM_END - 0x10000)
    return h, RAM_END - 0x10000


def test_unreadable_commands_are_skipped_like_kvm():
    h, base = _queue_at_ram_end()
    h.ram.poke(base, C.encode_sync() * 2047 + C.encode_mapc(0, 1))
    h.its.mmio_write(R.GITS_CWRITER, 8, 0xFFE0)
    h.its.mmio_write(R.GITS_CWRITER, 8, 0x10040)    # 3 commands: 1 readable, 2 not
    assert h.its.creadr == 0x10040
    assert h.its.error_counts == {C.E_ITS_CMDQ_READ_FAULT: 2}
    assert h.its.dump()["collections"] == {0: 1}
    assert [r.error for r in h.records[-3:]] == [0, C.E_ITS_CMDQ_READ_FAULT,
                                                 C.E_ITS_CMDQ_READ_FAULT]


def test_unreadable_command_stalls_with_the_stall_policy():
    h, base = _queue_at_ram_end(STALL)
    h.ram.poke(base, C.encode_sync() * 2048)
    h.its.mmio_write(R.GITS_CWRITER, 8, 0x10020)
    assert h.its.stalled and h.its.creadr == 0x10000
    assert h.its.error_counts == {C.E_ITS_CMDQ_READ_FAULT: 1}


def test_queue_entirely_outside_ram():
    h = Harness(queue_pages=256, queue_base=0x10_0000_0000)
    its = h.its
    its.mmio_write(R.GITS_CWRITER, 8, 0xFFFE0)
    assert its.creadr == 1024 * 32                  # one budget's worth per write
    while its.pending_commands:
        its.process_commands()
    assert its.error_counts == {C.E_ITS_CMDQ_READ_FAULT: 0xFFFE0 // 32}
    assert its.ite_count == 0
    # every attempted access was bounded in size
    assert max(a[2] for a in h.ram.accesses) <= 1024 * 32


def test_a_sink_calling_back_into_the_queue_does_not_recurse():
    h = Harness()
    calls = []

    class Reentrant(RecordingSink):
        def set_pending(self, intid, target):
            calls.append(h.its.process_commands())
            h.its.mmio_write(R.GITS_CWRITER, 8, h.its.cwriter)
            super().set_pending(intid, target)

    h.its.sink = Reentrant()
    assert h.run(C.encode_mapd(1, itt(1), 2), C.encode_mapc(0, 0),
                 C.encode_mapti(1, 0, 8192, 0), C.encode_int(1, 0), C.encode_sync()) == []
    assert calls == [0] and h.its.creadr == 5 * 32


def test_largest_queue_full_cycle():
    h = Harness(queue_pages=256)
    n = (256 * 4096) // 32
    h.ram.poke(QUEUE, C.encode_sync() * n)
    h.its.mmio_write(R.GITS_CWRITER, 8, (n - 1) * 32)
    while h.its.pending_commands:
        h.its.process_commands()
    h.its.mmio_write(R.GITS_CWRITER, 8, 0)
    assert h.its.mmio_read(R.GITS_CREADR, 8) == 0 and h.its.commands_processed == n
