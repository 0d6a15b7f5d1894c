"""The userspace ITS's delivery path on the host: guest driver -> UserMachineIts -> ItsModel ->
HiddenIts -> a stand-in for the hidden in-kernel ITS.

The stand-in is a second ItsModel behind the same register interface KVM's ITS device offers
(GITS_* by attribute, KVM_SIGNAL_MSI), so what HiddenIts programs is executed by an ITS that
follows the architecture. The checks: after any sequence of guest commands, every (DeviceID,
EventID) the guest's ITS translates reaches the same LPI on the same vCPU through the hidden
one, and every interrupt the guest's ITS makes pending is made pending there, on that vCPU.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmits.gic import regs
from kvmits.its import registers as R
from kvmits.its import ItsConfig, ItsModel, RecordingSink, Redistributors
from kvmits.its import commands as cmd
from kvmits.kvm import GuestMemory
from kvmits.lab.guest_driver import GuestGic, GuestHeap, GuestIts
from kvmits.machine.its.hidden import (CREATOR_DEVID, INJECTOR_FIRST_DEVID, LPI_BASE, NR_INJECTORS, PRIVATE_SIZE,
                                       UNTARGETED_ICID, HiddenIts, injector_msi)
from kvmits.machine.its.user import UserMachineIts

RAM = 0x40000000
ITS = 0x08080000
GICR = 0x080A0000
HIDDEN = 0x0B000000
PRIVATE = 0x0C000000
CPUS = 4


class KvmAffinitySink(RecordingSink):
    """A RecordingSink that also keeps each LPI's target vCPU the way KVM keeps it: one per LPI
    (set by its first ITE, None if that ITE's collection has none; by MOVI and MAPC), moved by
    MOVALL without its ITEs, gone with its last ITE."""

    def __init__(self):
        super().__init__()
        self.location: dict[int, int] = {}
        self.refs: dict[int, int] = {}

    def mapped(self, intid, target):
        super().mapped(intid, target)
        self.refs[intid] = self.refs.get(intid, 0) + 1
        self.location.setdefault(intid, target)

    def unmapped(self, intid, target):
        super().unmapped(intid, target)
        self.refs[intid] -= 1
        if not self.refs[intid]:
            del self.refs[intid], self.location[intid]

    def move(self, intid, old_target, new_target):
        super().move(intid, old_target, new_target)
        self.location[intid] = new_target

    def move_all(self, old_target, new_target):
        super().move_all(old_target, new_target)
        for intid, target in self.location.items():
            if target == old_target:
                self.location[intid] = new_target


class StandInKernelIts:
    """KVM's ITS device as HiddenIts sees it: GITS_* registers by attribute, a doorbell."""

    def __init__(self, memory):
        self.sink = KvmAffinitySink()
        self.model = ItsModel(memory, self.sink, CPUS)
        self.doorbell = HIDDEN + R.GITS_TRANSLATER

    def set_reg(self, offset, value):
        self.model.mmio_write(offset, 4 if offset in (R.GITS_CTLR,) else 8, value)

    def get_reg(self, offset):
        return self.model.mmio_read(offset, 4 if offset in (R.GITS_CTLR,) else 8)


class StandInVm:
    def __init__(self, kernel_its):
        self.kernel_its = kernel_its
        self.msis = []

    def signal_msi(self, address, data, devid=None):
        assert address == self.kernel_its.doorbell
        assert INJECTOR_FIRST_DEVID <= devid < INJECTOR_FIRST_DEVID + NR_INJECTORS
        self.msis.append(data)
        return 1 if self.kernel_its.model.signal_msi(devid, data) else 0


class RecordingRoutes:
    """The MSI routes as the command path sees them: the model's generation at each compile()."""

    def __init__(self, model):
        self.model = model
        self.compiled = []

    def compile(self, translate):
        assert translate == self.model.translate
        self.compiled.append(self.model.generation)


class FixedLimit:
    refreshes = 0

    def refresh(self):
        self.refreshes += 1
        return 1 << 16

    def __call__(self):
        return 1 << 16


class Guest:
    """A vCPU's loads/stores: the ITS frame goes to the UserMachineIts, GICR to a register file."""

    def __init__(self, frame):
        self.frame = frame
        self.gicr = {}

    def read(self, addr, width):
        if ITS <= addr < ITS + R.ITS_FRAME_SIZE:
            return self.frame.mmio_read(0, addr - ITS, width)
        cpu, off = divmod(addr - GICR, regs.GICR_STRIDE)
        return 1 if off == regs.GICR_TYPER else self.gicr.get((cpu, off), 0)

    def write(self, addr, width, value):
        if ITS <= addr < ITS + R.ITS_FRAME_SIZE:
            return self.frame.mmio_write(0, addr - ITS, width, value)
        cpu, off = divmod(addr - GICR, regs.GICR_STRIDE)
        self.gicr[(cpu, off)] = value


class Rig:
    def __init__(self, config: ItsConfig | None = None):
        self.ram = GuestMemory(RAM, 16 << 20)
        self.private = GuestMemory(PRIVATE, PRIVATE_SIZE)
        self.kernel = StandInKernelIts(self.private)
        self.vm = StandInVm(self.kernel)
        self.engine = HiddenIts(self.vm, self.kernel, self.private, CPUS)
        self.engine.program()
        self.model = ItsModel(self.ram, self.engine, Redistributors(CPUS), config)
        self.guest_commands = []
        self.model.command_observers.append(lambda rec: self.guest_commands.append(rec.name))
        self.limit = FixedLimit()
        self.pauses = 0
        self.routes = RecordingRoutes(self.model)
        self.frame = UserMachineIts(self.model, self.engine, self.pause, self.limit, base=ITS, ram=self.ram,
                                    nr_vcpus=CPUS, routes=self.routes)
        self.guest = Guest(self.frame)
        heap = GuestHeap(self.ram, RAM + (1 << 20), RAM + (16 << 20))
        self.gic = GuestGic(self.guest, self.ram, heap, lambda c: GICR + c * regs.GICR_STRIDE, CPUS)
        self.its = GuestIts(self.guest, self.ram, heap, ITS)
        self.gic.enable_lpis(enabled=True)
        self.its.setup()
        for cpu in range(CPUS):
            self.its.mapc(cpu, cpu)

    def pause(self):
        self.pauses += 1
        return nullcontext()

    def close(self):
        self.ram.close()
        self.private.close()

    def check_same_translation(self, devices):
        """Every translating (DeviceID, EventID) has its LPI on the hidden ITS, on the vCPU
        engine.mapping() says and KVM would have it (KvmAffinitySink); that is the ITE's own
        target unless another ITE maps the same LPI (it is where the first one, or the last
        MOVI/MAPC, put it) or a MOVALL moved it."""
        assert self.engine.mapping() == {i: t for i, t in self.kernel.sink.location.items() if t is not None}
        movall = "MOVALL" in self.guest_commands
        users = {}
        for _, _, intid, _, _ in self.model.live_mappings():
            users[intid] = users.get(intid, 0) + 1
        for devid, events in devices.items():
            for ev in range(events):
                t = self.model.translate(devid, ev)
                if not t.ok:
                    continue
                h = self.kernel.model.translate(*injector_msi(t.intid))
                assert h.ok and h.intid == t.intid, (devid, ev, t, h)
                if users[t.intid] == 1 and not movall:
                    assert h.target == t.target, (devid, ev, t, h)


def test_program_maps_the_injector_and_one_collection_per_vcpu():
    rig = Rig()
    try:
        dump = rig.kernel.model.dump()
        assert dump["collections"] == {c: c for c in range(CPUS)}
        assert sorted(dump["devices"]) == [CREATOR_DEVID] + [INJECTOR_FIRST_DEVID + k for k in range(NR_INJECTORS)]
        assert rig.kernel.model.error_counts == {}
    finally:
        rig.close()


def test_one_stop_per_cwriter_write_and_mirrored_delivery():
    rig = Rig()
    try:
        stops = rig.frame.stops
        rig.its.mapd(5, 4)
        rig.its.submit(*(cmd for cmd in []))  # nothing: a CWRITER write that publishes nothing
        for ev in range(4):
            rig.its.mapti(5, ev, 8300 + ev, ev)
        assert rig.frame.stops - stops == 6      # mapd, empty, 4 x mapti: one stop each
        rig.check_same_translation({5: 4})
        rig.kernel.sink.calls.clear()
        assert rig.model.signal_msi(5, 2)        # the slow path: KVM_SIGNAL_MSI, no stop
        assert rig.frame.stops - stops == 6
        assert rig.kernel.sink.of("set_pending") == [(8302, 2)]
        rig.its.int_(5, 3)                       # INT runs inside the batch, after what precedes it
        assert rig.kernel.sink.of("set_pending")[-1] == (8303, 3)
        rig.its.movi(5, 3, 0)
        rig.check_same_translation({5: 4})
        assert (8303, 0) in rig.kernel.sink.pending     # MOVI carried the pending state
        rig.its.discard(5, 1)
        assert not rig.kernel.model.translate(*injector_msi(8301)).ok
        rig.its.mapd(5, 4, valid=False)
        assert rig.engine.mapping() == {}
        assert rig.kernel.model.error_counts == {}
    finally:
        rig.close()


def test_the_guest_s_commands_are_in_the_command_log_and_the_debug_log(caplog):
    rig = Rig()
    try:
        rig.its.mapd(7, 2)
        rig.its.mapti(7, 1, 8400, 1)
        with caplog.at_level("DEBUG", logger="kvmits.machine.its.user"):
            rig.its.movi(7, 1, 3)
        movi = rig.frame.command_log[-1]
        assert movi.name == "MOVI" and not movi.error
        assert [r.name for r in rig.frame.command_log][-3:] == ["MAPD", "MAPTI", "MOVI"]
        assert any("'command': 'MOVI'" in r.getMessage() and "'devid': 7" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    finally:
        rig.close()


def test_a_clear_of_an_lpi_whose_collection_was_unmapped_clears_it_on_the_hidden_its():
    """KVM clears the LPI's latch on a CLEAR through an ITE whose collection is gone (1000-
    program differential, 6.1, seed 889): so must what the userspace ITS makes of it."""
    rig = Rig()
    try:
        rig.its.mapd(3, 2)
        rig.its.mapti(3, 2, 8233, 0)
        rig.its.int_(3, 2)
        rig.its.movi(3, 2, 1)
        assert (8233, 1) in rig.kernel.sink.pending
        rig.its.mapc(1, 1, valid=False)
        rig.its.clear(3, 2)
        assert not any(intid == 8233 for intid, _ in rig.kernel.sink.pending), rig.kernel.sink.pending
        assert rig.model.targetless_commands == 1
    finally:
        rig.close()


def test_mapc_retarget_moves_lpis_without_dropping_pending_state():
    rig = Rig()
    try:
        rig.its.mapd(9, 2)
        rig.its.mapti(9, 0, 8400, 1)
        rig.gic.set_lpi_config(8400, enabled=False)
        rig.its.inv(9, 0)
        rig.its.int_(9, 0)
        assert (8400, 1) in rig.kernel.sink.pending
        rig.its.mapc(1, 3)                       # collection 1 now on vCPU 3
        rig.check_same_translation({9: 2})
        assert (8400, 3) in rig.kernel.sink.pending and (8400, 1) not in rig.kernel.sink.pending
        assert rig.kernel.sink.of("invalidate")[-1] == (8400, 1)
    finally:
        rig.close()


def test_commands_left_by_the_budget_reach_the_hidden_its_when_the_guest_polls():
    """With a command budget below the batch, the guest's GITS_CREADR polls run the rest: each
    such read stops the vCPUs and mirrors what it ran on the hidden ITS, as a CWRITER write does."""
    rig = Rig(ItsConfig(command_budget=2))
    try:
        rig.its.mapd(5, 4)
        pauses = rig.pauses
        rig.its.submit(*(cmd.encode_mapti(5, ev, 8300 + ev, ev % CPUS) for ev in range(7)))
        assert rig.pauses - pauses == 4            # the write (2 commands), then 3 polls (2, 2, 1)
        assert not rig.engine.dirty
        rig.check_same_translation({5: 16})
        rig.kernel.sink.calls.clear()
        assert rig.model.signal_msi(5, 6)          # delivered at once: nothing waits unflushed
        assert rig.kernel.sink.of("set_pending") == [(8306, 2)]
    finally:
        rig.close()


def test_a_register_write_that_unmaps_is_done_once_and_mirrored():
    """GITS_BASER0.Valid = 0 forgets every device (KVM): the hidden ITS drops their LPIs and
    the MSI routes are recompiled; the guest's write reaches the model once."""
    rig = Rig()
    try:
        changes, writes = [], []
        rig.routes.compiled = changes
        model_write = rig.model.mmio_write

        def counting_write(offset, size, value, devid=0):
            writes.append(offset)
            model_write(offset, size, value, devid)

        rig.model.mmio_write = counting_write
        rig.its.mapd(5, 2)
        rig.its.mapti(5, 1, 8301, 2)
        assert rig.engine.mapping() == {8301: 2}
        baser0 = rig.its.read_reg(R.GITS_BASER(0))
        rig.its.write_reg(R.GITS_CTLR, 0, 4)
        changes.clear()
        writes.clear()
        rig.its.write_reg(R.GITS_BASER(0), baser0 & ~(1 << 63))
        assert writes == [R.GITS_BASER(0)]
        assert rig.model.dump()["devices"] == {}
        assert rig.engine.mapping() == {} and not rig.kernel.model.translate(*injector_msi(8301)).ok
        assert changes == [rig.model.generation]
    finally:
        rig.close()


OPS = st.one_of(
    st.tuples(st.just("mapd"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("mapti"), st.integers(0, 3), st.integers(0, 3), st.integers(8192, 8199), st.integers(0, 5)),
    st.tuples(st.just("movi"), st.integers(0, 3), st.integers(0, 3), st.integers(0, 5)),
    st.tuples(st.just("discard"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("mapc"), st.integers(0, 5), st.integers(0, CPUS - 1), st.booleans()),
    st.tuples(st.just("int"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("clear"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("movall"), st.integers(0, CPUS - 1), st.integers(0, CPUS - 1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=25))
def test_random_command_streams_keep_the_hidden_its_in_step(ops):
    rig = Rig()
    try:
        for op in ops:
            name, *args = op
            before = len(rig.kernel.sink.calls)
            if name == "mapd":
                rig.its.mapd(args[0], 2, valid=args[1])
            elif name == "mapti":
                rig.its.mapti(*args)
            elif name == "movi":
                rig.its.movi(*args)
            elif name == "discard":
                rig.its.discard(*args)
            elif name == "mapc":
                rig.its.mapc(args[0], args[1], valid=args[2])
            elif name == "int":
                t = rig.model.translate(*args)
                rig.its.int_(*args)
                if t.ok:
                    assert ("set_pending", t.intid, t.target) in rig.kernel.sink.calls[before:]
            elif name == "clear":
                rig.its.clear(*args)
            elif name == "movall":
                if args[0] == args[1]:
                    continue
                rig.its.movall(*args)
            rig.check_same_translation({d: 4 for d in range(4)})
        assert rig.kernel.model.error_counts == {}, rig.kernel.model.error_log
    finally:
        rig.close()


@pytest.fixture
def watched():
    """A Rig, and the names of the commands its hidden ITS runs, as they run."""
    rig = Rig()
    sent = []
    rig.kernel.model.command_observers.append(lambda rec: sent.append(rec.name))
    try:
        yield rig, sent
    finally:
        rig.close()


def test_movi_after_movall_is_always_sent(watched):
    """KVM's MOVALL retargets the LPIs but not their ITEs: a later MOVI back to the ITE's own
    collection must still reach the hidden ITS, or the LPI would stay where MOVALL put it."""
    rig, sent = watched
    rig.its.mapd(3, 1)
    rig.its.mapti(3, 0, 8500, 1)
    rig.its.movall(1, 2)
    assert "MOVALL" in sent
    sent.clear()
    # in one batch the guest unmaps the LPI and maps it again on collection 1: the hidden ITE
    # already names vCPU 1, but KVM's LPI sits on vCPU 2 since the MOVALL
    # the hidden ITS does what KVM does to its own interrupt at the same point: lets it go with
    # the last ITE (it lives on only while queued, pending, and then keeps vCPU 2 in both), makes
    # it again on the new ITE's target; no CLEAR (KVM's DISCARD leaves the pending state)
    rig.its.submit(cmd.encode_discard(3, 0), cmd.encode_mapti(3, 0, 8500, 1))
    assert sent == ["DISCARD", "MAPTI"] and rig.engine.mapping() == {8500: 1}
    sent.clear()
    rig.its.movall(1, 2)
    rig.its.movi(3, 0, 1)                    # MOVI to the ITE's own collection undoes the MOVALL
    assert sent == ["MOVALL", "MOVI"] and rig.engine.mapping() == {8500: 1}


def test_a_shared_lpi_stays_where_its_first_ite_put_it(watched):
    """In KVM an LPI is one interrupt with one target: a second ITE mapping it finds it where it
    is (vgic_add_lpi returns the existing one); a MOVI of either ITE moves it; it goes only when
    the last ITE does. mapping() is where an MSI really lands, not the ITE's translation."""
    rig, sent = watched
    rig.its.mapd(5, 2)
    rig.its.mapti(5, 0, 8500, 1)
    sent.clear()
    rig.its.mapti(5, 1, 8500, 2)
    assert sent == [] and rig.engine.mapping() == {8500: 1}
    assert rig.model.translate(5, 1).target == 2          # the translation says vCPU 2 ...
    rig.kernel.sink.calls.clear()
    assert rig.model.signal_msi(5, 1)
    assert rig.kernel.sink.of("set_pending") == [(8500, 1)]   # ... the LPI is on vCPU 1
    rig.its.movi(5, 1, 3)
    assert sent == ["MOVI"] and rig.engine.mapping() == {8500: 3}
    rig.its.discard(5, 1)
    assert rig.engine.mapping() == {8500: 3}                # ITE (5, 0) still maps it
    rig.its.discard(5, 0)
    assert rig.engine.mapping() == {}
    assert rig.kernel.model.error_counts == {}


def test_a_mapc_to_the_same_target_undoes_a_movall(watched):
    """MOVALL moves LPIs, not ITEs; KVM's MAPC re-applies the collection's target to its LPIs
    even when the target does not change (update_affinity_collection), and so does MOVI."""
    rig, sent = watched
    rig.its.mapd(5, 2)
    rig.its.mapti(5, 0, 8500, 1)
    rig.its.mapti(5, 1, 8501, 1)
    rig.its.movall(1, 2)
    assert rig.engine.mapping() == {8500: 2, 8501: 2}
    sent.clear()
    rig.its.mapc(1, 1)
    assert sent.count("MOVI") == 2 and rig.engine.mapping() == {8500: 1, 8501: 1}
    rig.its.movall(1, 0)
    rig.its.movi(5, 1, 1)                    # the same collection: the LPI still comes back
    assert rig.engine.mapping() == {8500: 0, 8501: 1}


def test_an_lpi_first_mapped_without_a_target_is_made_without_one(watched):
    """KVM makes an LPI's interrupt with its first ITE, and without a target vCPU when that ITE's
    collection has none (MAPTI names a collection MAPC has not mapped yet): an INT through a
    later ITE on a mapped collection latches it but queues it nowhere. The hidden ITS makes its
    interrupt the same way, through the creator device and the one collection it never maps."""
    rig, sent = watched
    rig.its.mapd(5, 2)
    rig.its.mapti(5, 0, 8600, 7)                 # collection 7: no target yet
    assert sent == ["MAPTI", "MAPTI", "MAPD"]
    dump = rig.kernel.model.dump()
    assert dump["devices"][CREATOR_DEVID]["events"] == {}            # its ITE freed again ...
    devid, event = injector_msi(8600)
    assert dump["devices"][devid]["events"][event] == {"icid": 0, "intid": 8600}
    assert rig.kernel.sink.location[8600] is None                    # ... the interrupt has no target
    assert 8600 not in rig.engine.mapping()
    sent.clear()
    rig.its.mapti(5, 1, 8600, 2)                 # a second ITE finds it as it is
    assert sent == [] and 8600 not in rig.engine.mapping()
    rig.its.mapc(7, 3)                           # update_affinity_collection gives it vCPU 3
    assert sent == ["MOVI"] and rig.engine.mapping() == {8600: 3}
    rig.its.discard(5, 1)
    rig.its.discard(5, 0)
    assert rig.engine.mapping() == {} and rig.kernel.model.error_counts == {}
    assert UNTARGETED_ICID not in rig.kernel.model.dump()["collections"]


def test_injector_events_spread_over_devices_of_1024_events():
    """KVM walks a device's ITE list per command and per translation-cache miss: the hidden
    ITS keeps each list at 1024 ITEs, one event per LPI over NR_INJECTORS devices."""
    seen = {injector_msi(intid) for intid in range(LPI_BASE, 1 << 16)}
    assert len(seen) == (1 << 16) - LPI_BASE
    assert injector_msi(LPI_BASE) == (INJECTOR_FIRST_DEVID, 0)
    assert injector_msi(LPI_BASE + 1023) == (INJECTOR_FIRST_DEVID, 1023)
    assert injector_msi(LPI_BASE + 1024) == (INJECTOR_FIRST_DEVID + 1, 0)
    assert injector_msi((1 << 16) - 1) == (INJECTOR_FIRST_DEVID + NR_INJECTORS - 1, 1023)
    assert all(event < 1024 for _, event in seen)
