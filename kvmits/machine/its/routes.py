"""MSIs into an in-kernel ITS: a (DeviceID, EventID) -> GSI table compiled into KVM's GSI
routing (KVM_SET_GSI_ROUTING, KVM_IRQ_ROUTING_MSI with KVM_MSI_VALID_DEVID), one irqfd per GSI.

On arm64 an MSI is a write of the EventID to GITS_TRANSLATER with the DeviceID on the side;
KVM carries the DeviceID in the route's devid field, which is why KVM_MSI_VALID_DEVID is set on
every route (api.rst, 4.52 KVM_SET_GSI_ROUTING). A write to a route's EventFd makes KVM translate
the MSI through the ITS and raise the LPI, without waking Python. No vCPU pause is needed.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvmits.kvm import EventFd, MsiRoute

#: KVM_MAX_IRQ_ROUTES (include/linux/kvm_host.h): GSIs are below it
MAX_GSI = 4096


class MsiRoutes:
    """The VM's whole MSI routing table for one ITS doorbell (the guest-physical address of its
    GITS_TRANSLATER), and the EventFds it owns: one per GSI, bound with KVM_IRQFD."""

    def __init__(self, vm, doorbell: int):
        self.vm = vm
        self.doorbell = doorbell
        self._table: dict[tuple[int, int], int] = {}
        self._efds: dict[int, EventFd] = {}          # gsi -> its irqfd

    def set(self, table: Mapping[tuple[int, int], int]) -> dict[tuple[int, int], EventFd]:
        """Replace the routing table with `table`: (DeviceID, EventID) -> GSI. Returns
        (DeviceID, EventID) -> EventFd; write(1) to one to signal that MSI. A GSI kept from the
        previous table keeps its EventFd (now meaning the new entry); dropped GSIs lose theirs."""
        table = dict(table)
        gsis: dict[int, tuple[int, int]] = {}
        for (devid, eventid), gsi in table.items():
            if not (0 <= devid < 1 << 32 and 0 <= eventid < 1 << 32):
                raise ValueError(f"DeviceID/EventID out of range: {(devid, eventid)}")
            if not 0 <= gsi < MAX_GSI:
                raise ValueError(f"GSI {gsi} out of range 0..{MAX_GSI - 1}")
            if gsi in gsis:
                raise ValueError(f"GSI {gsi} given to both {gsis[gsi]} and {(devid, eventid)}")
            gsis[gsi] = (devid, eventid)
        routes = [MsiRoute(gsi, self.doorbell, eventid, devid) for (devid, eventid), gsi in table.items()]
        self.vm.set_gsi_routing(routes)              # fails as a whole: nothing changed yet
        for gsi in [g for g in self._efds if g not in gsis]:
            efd = self._efds.pop(gsi)
            self.vm.irqfd_deassign(efd, gsi)
            efd.close()
        for gsi in gsis:
            if gsi not in self._efds:
                efd = EventFd()
                try:
                    self.vm.irqfd(efd, gsi)
                except BaseException:
                    efd.close()
                    raise
                self._efds[gsi] = efd
        self._table = table
        return {key: self._efds[gsi] for key, gsi in table.items()}

    @property
    def table(self) -> dict[tuple[int, int], int]:
        return dict(self._table)

    def eventfd(self, devid: int, eventid: int) -> EventFd:
        """The EventFd that signals MSI (devid, eventid); KeyError if it has no route."""
        return self._efds[self._table[(devid, eventid)]]

    def clear(self) -> None:
        """No routes, no irqfds."""
        self.set({})

    def close(self) -> None:
        """Deassign and close every EventFd (the routing table stays with the VM)."""
        for gsi, efd in list(self._efds.items()):
            if self.vm.fd >= 0:
                self.vm.irqfd_deassign(efd, gsi)
            efd.close()
        self._efds.clear()
        self._table = {}
