"""A machine's ITS: one interface (MachineIts), two implementations, and what they are made of.

- interface: MachineIts, the protocol Machine.its always has; NoItsError;
- kernel: KernelMachineIts, the in-kernel ITS as the guest's ITS;
- user: UserMachineIts, kvmits' Python model as the guest's ITS (its frame, the command path);
- hidden: HiddenIts, the in-kernel ITS the userspace ITS delivers LPIs through;
- routes: irqfd MSI routes for each (MsiRoutes, UserMsiRoutes).
"""

from kvmits.machine.its.interface import MachineIts, NoItsError, require_its
from kvmits.machine.its.kernel import KernelMachineIts
from kvmits.machine.its.user import UserMachineIts

#: what MachineConfig(its=...) accepts (None: no ITS, and the guest sees no LPIs at all)
ITS_IMPLEMENTATIONS: dict[str, type[MachineIts]] = {"kernel": KernelMachineIts, "user": UserMachineIts}
ITS_KINDS = tuple(ITS_IMPLEMENTATIONS)

__all__ = ["MachineIts", "NoItsError", "require_its", "KernelMachineIts", "UserMachineIts", "ITS_IMPLEMENTATIONS", "ITS_KINDS"]
