"""Thin wrappers of KVM's in-kernel GICv3 devices: the vGICv3 and the ITS.

Every attribute access on these devices needs all vCPUs outside KVM_RUN (else EBUSY): the
machine's pause_all() / paused() is how callers get there.
"""

from kvmits.gic.kernel_its import KernelIts
from kvmits.gic.vgic import GICD_SIZE, VGicV3

__all__ = ["VGicV3", "KernelIts", "GICD_SIZE"]
