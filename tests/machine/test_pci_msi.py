"""MSI-X vectors on the machine's routing table (kvmits.machine.pci.msi): the table each vector
entry makes, GSI allocation and sharing, user routes next to device vectors, hostile messages."""

from __future__ import annotations

import pytest

from kvmits.errors import KvmError
from kvmits.machine.its.routes import MAX_GSI
from kvmits.machine.pci.msi import MsiRouter

DOORBELL = 0x0809_0040


class FakeEventFd:
    def __init__(self):
        self.count = 0
        self.closed = False

    def write(self, value=1):
        assert not self.closed, "written after close"
        self.count += value

    def read(self):
        value, self.count = self.count, 0
        return value

    def close(self):
        self.closed = True


class FakeIts:
    """set_msi_routes as both ITSes answer it: the whole table each call, (DeviceID, EventID)
    -> EventFd, an EventFd kept while its entry stays."""

    doorbell = DOORBELL

    def __init__(self):
        self.tables = []
        self.efds = {}
        self.fail = None

    def set_msi_routes(self, table):
        if self.fail:
            raise self.fail
        self.tables.append(dict(table))
        for key in [k for k in self.efds if k not in table]:
            self.efds.pop(key).close()
        for key in table:
            self.efds.setdefault(key, FakeEventFd())
        return dict(self.efds)

    @property
    def table(self):
        return self.tables[-1] if self.tables else {}


@pytest.fixture
def its():
    return FakeIts()


def test_a_vector_becomes_a_devid_eventid_route_and_fire_writes_its_eventfd(its):
    router = MsiRouter(its)
    sink = router.sink(8, "dev")
    sink.route(0, DOORBELL, 5)
    assert its.table == {(8, 5): MAX_GSI - 1}
    sink.fire(0)
    sink.fire(0)
    assert its.efds[(8, 5)].read() == 2 and sink.fired == 2


def test_a_new_message_moves_the_vector_and_frees_the_old_entry(its):
    router = MsiRouter(its)
    sink = router.sink(8, "dev")
    sink.route(0, DOORBELL, 5)
    sink.route(1, DOORBELL, 6)
    sink.route(0, DOORBELL, 7)
    assert set(its.table) == {(8, 6), (8, 7)}
    assert len(set(its.table.values())) == 2
    sink.fire(0)
    assert its.efds[(8, 7)].read() == 1 and its.efds[(8, 6)].read() == 0


def test_two_vectors_with_one_message_share_its_gsi_until_both_move(its):
    router = MsiRouter(its)
    a, b = router.sink(8, "a"), router.sink(8, "b")
    a.route(0, DOORBELL, 3)
    b.route(2, DOORBELL, 3)
    assert its.table == {(8, 3): MAX_GSI - 1}
    a.route(0, DOORBELL, 4)
    assert (8, 3) in its.table                  # b still sends it
    b.route(2, DOORBELL, 9)
    assert set(its.table) == {(8, 4), (8, 9)}


def test_a_message_not_to_the_its_doorbell_is_not_routed_and_its_fires_are_counted(its, caplog):
    router = MsiRouter(its)
    sink = router.sink(16, "dev")
    sink.route(0, 0x4000_0000, 1)             # a guest pointing its MSI-X entry at RAM
    sink.route(1, 0xDEAD_BEEF_0000, 2)
    assert its.table == {} or its.tables == []
    sink.fire(0)
    sink.fire(1)
    sink.fire(7)                               # never routed at all
    assert (sink.bad_address, sink.unrouted, sink.fired) == (2, 1, 0)
    assert sum("not the ITS doorbell" in r.message for r in caplog.records) == 1


def test_a_vector_moved_to_a_bad_address_loses_its_route(its):
    router = MsiRouter(its)
    sink = router.sink(8, "dev")
    sink.route(0, DOORBELL, 1)
    sink.route(0, 0x1234, 1)
    assert its.table == {}
    sink.fire(0)
    assert sink.bad_address == 1


def test_user_routes_and_device_vectors_share_one_table(its):
    router = MsiRouter(its)
    sink = router.sink(8, "dev")
    sink.route(0, DOORBELL, 1)
    efds = router.set_user({(1, 0): 0, (1, 1): 1})
    assert its.table == {(8, 1): MAX_GSI - 1, (1, 0): 0, (1, 1): 1}
    assert set(efds) == {(1, 0), (1, 1)}
    sink.route(1, DOORBELL, 2)                 # a device vector keeps the user routes
    assert {(1, 0), (1, 1), (8, 1), (8, 2)} == set(its.table)
    router.set_user({})
    assert set(its.table) == {(8, 1), (8, 2)}


def test_a_user_gsi_held_by_a_vector_is_refused_and_changes_nothing(its):
    router = MsiRouter(its)
    router.sink(8, "dev").route(0, DOORBELL, 1)
    before = dict(its.table)
    with pytest.raises(ValueError, match=f"GSI {MAX_GSI - 1} is in use"):
        router.set_user({(1, 0): MAX_GSI - 1})
    assert its.table == before


def test_device_vectors_skip_gsis_users_hold(its):
    router = MsiRouter(its)
    router.set_user({(1, 0): MAX_GSI - 1})
    router.sink(8, "dev").route(0, DOORBELL, 1)
    assert its.table[(8, 1)] == MAX_GSI - 2


def test_a_user_route_for_a_vector_s_msi_is_one_entry(its):
    router = MsiRouter(its)
    sink = router.sink(8, "dev")
    sink.route(0, DOORBELL, 1)
    efds = router.set_user({(8, 1): 5})
    assert its.table == {(8, 1): 5}
    sink.fire(0)
    assert efds[(8, 1)].read() == 1


def test_kvm_refusing_the_table_leaves_the_vector_unrouted_and_the_rest_as_it_was(its):
    router = MsiRouter(its)
    sink = router.sink(8, "dev")
    sink.route(0, DOORBELL, 1)
    its.fail = KvmError("KVM_SET_GSI_ROUTING", 22)
    sink.route(1, DOORBELL, 2)                 # logged, not raised: a guest write caused it
    its.fail = None
    sink.fire(1)
    assert sink.unrouted == 1
    sink.route(2, DOORBELL, 3)
    assert set(its.table) == {(8, 1), (8, 3)}
    assert router.table() == its.table


def test_gsis_run_out_gracefully(its):
    router = MsiRouter(its, gsis=range(4))
    sink = router.sink(8, "dev")
    for v in range(4):
        sink.route(v, DOORBELL, v)
    sink.route(4, DOORBELL, 4)                 # one too many: not routed, nothing raised
    sink.fire(4)
    assert sink.unrouted == 1 and sorted(its.table.values()) == [0, 1, 2, 3]
    sink.route(0, 0x1234, 0)                   # a vector gone elsewhere frees its GSI
    sink.route(4, DOORBELL, 4)
    sink.fire(4)
    assert its.efds[(8, 4)].read() == 1
