"""virtio 1.x (OASIS virtio 1.2) for kvmits' devices.

- virtqueue: the device side of a split virtqueue (2.7), pure logic over guest memory,
  bounded against a hostile driver.
- pci: the virtio-pci modern transport (4.1), device side: a PCI function a device plugs into.

The devices (5.x), each a VirtioDevice on a VirtioPciFunction (issue 12, item 3):
- blk: the block device (5.2), VirtioBlk, on a host file;
- rng: the entropy device (5.4), VirtioRng, from os.urandom or another source.
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
from kvmits.machine.devices.virtio.blk import VirtioBlk
from kvmits.machine.devices.virtio.rng import VirtioRng

__all__ = ["Chain", "NotifyAddress", "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_RING_F_INDIRECT_DESC", "VirtioBlk",
           "VirtioDevice", "VirtioPciFunction", "VirtioRng", "Virtqueue", "VirtqueueConfigError", "VirtqueueError",
           "VirtqueueStats"]
