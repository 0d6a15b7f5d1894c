"""virtio 1.x (OASIS virtio 1.2) for kvmits' devices.

- virtqueue: the device side of a split virtqueue (2.7), pure logic over guest memory,
  bounded against a hostile driver.

The virtio-pci transport (4.1) and the devices (5.x) build on it (issue 12, item 3).
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

__all__ = ["Chain", "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_RING_F_INDIRECT_DESC", "Virtqueue",
           "VirtqueueConfigError", "VirtqueueError", "VirtqueueStats"]
