"""virtio 1.x (OASIS virtio 1.2) for kvmits' devices.

- virtqueue: the device side of a split virtqueue (2.7), pure logic over guest memory,
  bounded against a hostile driver.
- pci: the virtio-pci modern transport (4.1), device side: a PCI function a device plugs into.

The devices (5.x) build on them (issue 12, item 3).
"""

from kvmits.machine.devices.virtio.virtqueue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Chain,
    Virtqueue,
    VirtqueueConfigError,
    VirtqueueError,
    VirtqueueStats,
)
from kvmits.machine.devices.virtio.pci import NotifyAddress, VirtioDevice, VirtioPciFunction

__all__ = ["Chain", "NotifyAddress", "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_RING_F_INDIRECT_DESC", "VirtioDevice",
           "VirtioPciFunction", "Virtqueue", "VirtqueueConfigError", "VirtqueueError", "VirtqueueStats"]
