"""virtio-rng (OASIS virtio 1.2, 5.4 "Entropy Device"), as pure logic over guest memory: a
VirtioDevice (see kvmits.machine.devices.virtio.pci) that fills the buffers the driver gives it
with bytes from a host source, os.urandom by default.

5.4: device ID 4, one queue (requestq), no feature bits of its own (the device offers the ring
features INDIRECT_DESC and EVENT_IDX), no configuration. 5.4.6: the driver makes device-writable
buffers available and the device fills them; 5.4.6.2: "The device MUST place one or more random
bytes into the buffer, but it MAY use less than the entire buffer length", so a chain gets at
most MAX_BYTES_PER_REQUEST bytes (whatever its buffers' lengths: nothing is allocated in
proportion to a guest length), written from the first writable byte on, and the used length is
their number (2.7.8). 5.4.6.1: "The driver MUST NOT place driver-readable buffers into the
queue": device-readable buffers are skipped, the chains that had some counted. A buffer outside
guest RAM ends the filling of its chain, which is returned with what was written before it.

Threads: as virtio-blk, one lock per device; notify comes from the device's ioeventfd thread or
a vCPU, reset from a vCPU, and reset waits for a notify in flight.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from kvmits.errors import GuestMemoryError
from kvmits.machine.devices.virtio.virtqueue import (VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
                                                     Virtqueue)

log = logging.getLogger(__name__)

#: 5.4.1 (Linux's virtio_ids.h VIRTIO_ID_RNG)
VIRTIO_ID_RNG = 4
QUEUE_SIZE = 64
#: the most bytes one chain gets (5.4.6.2 allows fewer than the buffers hold)
MAX_BYTES_PER_REQUEST = 64 * 1024


class VirtioRng:
    """An entropy device; `source(n)` gives n random bytes (os.urandom, or a deterministic
    source for tests). Set `function` to the VirtioPciFunction carrying it.

    Counters: `requests` (chains returned), `bytes_given`, `ignored_readable` (chains with
    device-readable buffers, which 5.4.6.1 forbids), `bad_buffers` (chains cut short by a
    buffer outside guest RAM), `source_errors` (OSError from the source: the chain returned
    with what was written)."""

    device_type = VIRTIO_ID_RNG
    device_features = 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX
    queue_max_sizes = (QUEUE_SIZE,)
    config_size = 0

    def __init__(self, source: Callable[[int], bytes] = os.urandom):
        self.source = source
        #: the VirtioPciFunction carrying the device (set by whoever creates both)
        self.function = None
        self.requests = 0
        self.bytes_given = 0
        self.ignored_readable = 0
        self.bad_buffers = 0
        self.source_errors = 0
        self._lock = threading.Lock()

    # -- no configuration (5.4.4); the transport never calls these with config_size 0 -------------
    def config_read(self, offset: int, size: int) -> int:
        return 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass

    def reset(self) -> None:
        """2.4: nothing to forget but a notify in flight, which is waited for."""
        with self._lock:
            pass

    # -- the queue --------------------------------------------------------------------------------
    def notify(self, index: int, vq: Virtqueue) -> None:
        """Serve the queue (VirtioPciFunction.serve): each chain filled by _fill."""
        with self._lock:
            mem = vq.memory
            self.function.serve(index, vq, lambda chain: self._fill(mem, chain))

    def _fill(self, mem, chain) -> int:
        """Random bytes into the chain's writable buffers, in order; how many."""
        self.requests += 1
        if chain.readable:
            self.ignored_readable += 1
        left = MAX_BYTES_PER_REQUEST
        given = 0
        try:
            for gpa, n, writable in chain.buffers:
                if not writable or not n:
                    continue
                k = n if n < left else left
                data = self.source(k)
                if len(data) > k:
                    data = data[:k]
                mem.write(gpa, data)
                given += len(data)
                left -= len(data)
                if not left or len(data) < k:
                    break                   # the cap, or a source that gave less
        except GuestMemoryError:
            self.bad_buffers += 1
        except OSError as e:
            if not self.source_errors:
                log.warning("virtio-rng: the source failed: %s (logged once)", e)
            self.source_errors += 1
        self.bytes_given += given
        return given
