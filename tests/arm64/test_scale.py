"""Machines at scale with both ITSes on real arm64 KVM (issue 18): 64 vCPUs all taking LPIs,
2^16 DeviceIDs through a two-level device table, a device with 2^16 events, and the largest
command queue. Each at the smallest size that shows the mechanism: the architectural maximum
where the test is about it (DeviceIDs, EventIDs, queue slots), a sample of the entries inside.

The model's side of the same points, with every entry (all 65536 events of a device, a full
queue), is tests/its/test_scale.py on the host; the curves are `kvmits bench --parts 6`.
"""

from __future__ import annotations

import resource
import threading

import pytest

from kvmits.its import commands as cmd
from kvmits.its.registers import GITS_BASER_TYPE_DEVICE, LPI_BASE
from kvmits.lab.its_lab import ItsLab
from kvmits.machine.memmap import MAX_CPUS

pytestmark = pytest.mark.arm64

BIG_CPUS = 64
#: the largest command queue: GITS_CBASER.Size = 255, 256 pages of 4 KiB, 32768 slots
MAX_QUEUE = 256 * 0x1000
#: DeviceIDs and EventIDs of KVM's ITS (GITS_TYPER.Devbits + 1, IDbits + 1)
ID_BITS = 16


@pytest.fixture(scope="module")
def big_lab(arm64_kvm, its_kind):
    """64 vCPUs, the agent on each, LPIs on every redistributor, one collection per vCPU."""
    assert BIG_CPUS <= MAX_CPUS
    with ItsLab(cpus=BIG_CPUS, its=its_kind, timeout=120) as lab:
        lab.setup()
        yield lab


@pytest.fixture(scope="module")
def table_lab(arm64_kvm, its_kind):
    """2 vCPUs, a two-level device table, the largest command queue."""
    with ItsLab(cpus=2, its=its_kind, queue_size=MAX_QUEUE) as lab:
        lab.setup(two_level=True)
        yield lab


def _take(lab, n: int) -> list[tuple[int, int]]:
    got = lab.agent.wait_irqs(n, 60)
    return sorted((cpu, intid) for cpu, intid, _ in got)


def test_64_vcpus_each_take_their_lpi_by_msi_irqfd_and_after_a_batch(big_lab):
    lab = big_lab
    devid = 0x640
    lab.its.mapd(devid, 6)
    lab.its.submit(*(cmd.encode_mapti(devid, n, LPI_BASE + n, n) for n in range(BIG_CPUS)), cmd.encode_sync(0))
    want = [(n, LPI_BASE + n) for n in range(BIG_CPUS)]
    for n in range(BIG_CPUS):
        assert lab.msi(devid, n) == 1
    assert _take(lab, BIG_CPUS) == want
    efds = lab.routes({(devid, n): 64 + n for n in range(BIG_CPUS)})
    for n in range(BIG_CPUS):
        efds[(devid, n)].write(1)
    assert _take(lab, BIG_CPUS) == want
    # one batch moving every LPI to the next vCPU: the userspace ITS stops all 64 vCPUs for it
    lab.its.submit(*(cmd.encode_movi(devid, n, (n + 1) % BIG_CPUS) for n in range(BIG_CPUS)),
                   cmd.encode_sync(0))
    for n in range(BIG_CPUS):
        efds[(devid, n)].write(1)
    assert _take(lab, BIG_CPUS) == sorted(((n + 1) % BIG_CPUS, LPI_BASE + n) for n in range(BIG_CPUS))
    lab.routes({})
    lab.agent.check()


def test_64_vcpus_use_one_thread_each_and_bounded_idle_polling(big_lab):
    lab = big_lab
    vcpu_threads = [t for t in threading.enumerate() if t.name.startswith("vcpu")]
    assert len(vcpu_threads) == BIG_CPUS
    # the agents' bounded WFIs are mailbox polls into Python; the machine keeps them at 400/s
    # at most, or 64 idle vCPUs would starve the one doing the work (kvmits.machine.agent.protocol)
    from kvmits.machine.agent.protocol import DEFAULT_IDLE_US, IDLE_CPUS_PER_BOUND

    assert lab.machine.agent.mailbox.idle_us == DEFAULT_IDLE_US * BIG_CPUS // IDLE_CPUS_PER_BOUND
    assert lab.agent.ping(BIG_CPUS - 1, 7) == 7                   # the last vCPU serves requests


def test_device_ids_across_2_16_reach_the_guest_through_a_two_level_table(table_lab):
    lab = table_lab
    table = lab.its.tables[GITS_BASER_TYPE_DEVICE]
    assert table.indirect, "the ITS took GITS_BASER0.Indirect = 1"
    assert lab.its.device_bits == ID_BITS
    per_page = table.page_size // table.entry_size                  # 8192 DeviceIDs per level-2 page
    assert (1 << ID_BITS) // per_page == 8
    # a sample in each of the 8 level-2 pages, the first and the last DeviceID among them
    devids = [0, 0xFFFF] + [page * per_page + 1 + (page * 977) % (per_page - 2) for page in range(8)]
    assert len(set(devids)) == len(devids)
    for i, devid in enumerate(devids):
        lab.its.mapd(devid, 1)
        lab.its.mapti(devid, 1, LPI_BASE + 0x100 + i, i % lab.cpus)
    assert sorted(table.level2) == list(range(8))                   # each page made Valid on demand
    for i, devid in enumerate(devids):
        assert lab.msi(devid, 1) == 1, f"DeviceID {devid:#x}"
    assert _take(lab, len(devids)) == sorted((i % lab.cpus, LPI_BASE + 0x100 + i) for i in range(len(devids)))
    # past Devbits: an MSI from DeviceID 2^16 translates to nothing
    assert lab.msi(1 << ID_BITS, 1) == 0
    lab.agent.check()


def test_mapd_behind_an_invalid_level1_entry_fails_and_delivers_nothing(table_lab):
    lab = table_lab
    table = lab.its.tables[GITS_BASER_TYPE_DEVICE]
    per_page = table.page_size // table.entry_size
    # a DeviceID whose level-1 entry is not Valid: IHI 0069 5.2.2, the ITS has nowhere to keep
    # its entry, so MAPD fails (KVM: vgic_its_check_id, E_ITS_MAPD_DEVICE_OOR) and the device's
    # MSIs translate to nothing. The entry is read at MAPD time, from guest memory.
    hole = 0x2345
    slot = table.base + 8 * (hole // per_page)
    entry = lab.machine.ram.read_u64(slot)
    lab.machine.ram.write_u64(slot, 0)
    try:
        lab.its.submit(cmd.encode_mapd(hole, lab.heap.alloc(256, 256), 1),
                       cmd.encode_mapti(hole, 0, LPI_BASE + 0x200, 0), cmd.encode_sync(0))
        assert lab.msi(hole, 0) == 0
    finally:
        lab.machine.ram.write_u64(slot, entry)
    # with the entry Valid again, the same MAPD works
    lab.its.submit(cmd.encode_mapd(hole, lab.heap.alloc(256, 256), 1),
                   cmd.encode_mapti(hole, 0, LPI_BASE + 0x200, 0), cmd.encode_sync(0))
    assert lab.msi(hole, 0) == 1
    lab.expect(0, LPI_BASE + 0x200)
    lab.expect_none(0.2)


def test_a_device_with_2_16_events(table_lab):
    lab = table_lab
    devid = 0x1600
    dev = lab.its.mapd(devid, ID_BITS)                              # MAPD Size 15: a 512 KiB ITT
    assert dev.event_bits == ID_BITS
    events = [0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]
    lab.its.submit(*(cmd.encode_mapti(devid, ev, LPI_BASE + 0x300 + i, i % lab.cpus) for i, ev in enumerate(events)),
                   cmd.encode_sync(0))
    for ev in events:
        assert lab.msi(devid, ev) == 1, f"EventID {ev:#x}"
    assert _take(lab, len(events)) == sorted((i % lab.cpus, LPI_BASE + 0x300 + i) for i in range(len(events)))
    # an EventID past the ITT's 2^16 entries does not translate, and MAPTI refuses it
    assert lab.msi(devid, 1 << ID_BITS) == 0
    lab.its.submit(cmd.encode_mapti(devid, 1 << ID_BITS, LPI_BASE + 0x3FF, 0), cmd.encode_sync(0))
    assert lab.msi(devid, 1 << ID_BITS) == 0
    lab.expect_none(0.2)


def test_the_largest_command_queue_full_and_wrapping(table_lab):
    lab = table_lab
    assert lab.its.queue_size == MAX_QUEUE
    slots = MAX_QUEUE // 32
    devid = 0x1700
    lab.its.mapd(devid, 4)
    # fill the queue up to one slot short of full (GITS_CWRITER one behind GITS_CREADR), in one
    # GITS_CWRITER write: 16 MAPTIs, then INVs, then an INT of each event and a SYNC
    start = lab.its.cwriter // 32
    n = slots - 1
    body = [cmd.encode_mapti(devid, ev, LPI_BASE + 0x400 + ev, ev % lab.cpus) for ev in range(16)]
    tail = [cmd.encode_int(devid, ev) for ev in range(16)] + [cmd.encode_sync(0)]
    body += [cmd.encode_inv(devid, i % 16) for i in range(n - len(body) - len(tail))] + tail
    assert len(body) == n
    creadr = lab.its.submit(*body, timeout=600)
    assert creadr & 0xFFFE0 == lab.its.cwriter == (start + n) % slots * 32
    assert _take(lab, 16) == sorted((ev % lab.cpus, LPI_BASE + 0x400 + ev) for ev in range(16))
    # and a batch that wraps past the end of the queue (unless the fill ended exactly there)
    batch = [cmd.encode_int(devid, ev) for ev in range(8)] + [cmd.encode_sync(0)]
    if lab.its.cwriter // 32 + len(batch) <= slots:
        pad = slots - lab.its.cwriter // 32 - 4
        lab.its.submit(*[cmd.encode_sync(0)] * pad, timeout=600)
    before = lab.its.cwriter
    lab.its.submit(*batch)
    assert lab.its.cwriter < before                                  # it wrapped
    assert _take(lab, 8) == sorted((ev % lab.cpus, LPI_BASE + 0x400 + ev) for ev in range(8))
    lab.agent.check()


def test_thousands_of_irqfd_routes_fit_the_descriptor_limit(table_lab):
    """KVM_MAX_IRQ_ROUTES GSIs, each an irqfd: past the usual 1024-descriptor soft limit."""
    lab = table_lab
    devid = 0x1600                                                  # the 2^16-event device above
    keys = [(devid, ev) for ev in range(4000)]
    efds = lab.routes({key: 32 + i for i, key in enumerate(keys)})
    assert len(efds) == 4000
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 4000
    efds[(devid, 0xF00)].write(1)                                   # not mapped: nothing
    efds[(devid, 0x7FF)].write(1)
    efds[(devid, 1)].write(1)                                       # mapped: LPI 0x301 on vCPU 1
    lab.expect(1, LPI_BASE + 0x301)
    lab.routes({})
    lab.expect_none(0.2)
