"""MSI routes for irqfds: the (DeviceID, EventID) -> GSI table and the EventFds it owns."""

import pytest

from kvmits.kvm import MsiRoute
from kvmits.machine.its.routes import MsiRoutes

DOORBELL = 0x08090040


class FakeVm:
    fd = 3

    def __init__(self):
        self.routing = None
        self.irqfds = {}            # gsi -> fd
        self.log = []
        self.fail_routing = False

    def set_gsi_routing(self, routes):
        if self.fail_routing:
            raise OSError("EINVAL")
        self.routing = list(routes)
        self.log.append(("routing", len(self.routing)))

    def irqfd(self, efd, gsi):
        assert gsi not in self.irqfds
        self.irqfds[gsi] = efd.fileno()
        self.log.append(("irqfd", gsi))

    def irqfd_deassign(self, efd, gsi):
        assert self.irqfds.pop(gsi) == efd.fileno()
        self.log.append(("deassign", gsi))


def test_table_compiles_to_msi_routes_with_devid():
    vm = FakeVm()
    routes = MsiRoutes(vm, DOORBELL)
    efds = routes.set({(0x10, 0): 1, (0x10, 1): 2, (0x20, 5): 7})
    assert sorted(vm.routing) == [MsiRoute(1, DOORBELL, 0, 0x10), MsiRoute(2, DOORBELL, 1, 0x10),
                                  MsiRoute(7, DOORBELL, 5, 0x20)]
    assert sorted(vm.irqfds) == [1, 2, 7]
    assert set(efds) == {(0x10, 0), (0x10, 1), (0x20, 5)}
    assert vm.irqfds[7] == efds[(0x20, 5)].fileno()
    assert routes.eventfd(0x10, 1) is efds[(0x10, 1)]
    routes.close()
    assert vm.irqfds == {}


def test_replacing_the_table_keeps_surviving_gsis_and_drops_the_rest():
    vm = FakeVm()
    routes = MsiRoutes(vm, DOORBELL)
    first = routes.set({(1, 0): 1, (1, 1): 2})
    second = routes.set({(1, 0): 1, (2, 0): 3})
    assert second[(1, 0)] is first[(1, 0)]            # GSI 1 kept its EventFd and irqfd
    assert first[(1, 1)].fd == -1                       # GSI 2's was closed
    assert sorted(vm.irqfds) == [1, 3]
    assert vm.log == [("routing", 2), ("irqfd", 1), ("irqfd", 2), ("routing", 2), ("deassign", 2), ("irqfd", 3)]
    with pytest.raises(KeyError):
        routes.eventfd(1, 1)
    routes.clear()
    assert vm.irqfds == {} and vm.routing == [] and routes.table == {}


def test_invalid_tables_change_nothing():
    vm = FakeVm()
    routes = MsiRoutes(vm, DOORBELL)
    routes.set({(1, 0): 1})
    for bad in ({(1, 0): 5, (1, 1): 5}, {(1, 0): 4096}, {(-1, 0): 1}, {(1, 1 << 32): 1}):
        with pytest.raises(ValueError):
            routes.set(bad)
    vm.fail_routing = True
    with pytest.raises(OSError):
        routes.set({(9, 9): 9})
    assert routes.table == {(1, 0): 1} and sorted(vm.irqfds) == [1]
