"""The virtio-pci modern transport, device side (OASIS virtio 1.2, 4.1 "Virtio Over PCI Bus"),
as pure logic: a `VirtioPciFunction` is a PCI function (kvmits.machine.pci.host.PciFunction)
that a virtio device (a `VirtioDevice`) plugs into.

The function (4.1.2, 4.1.4)
- Vendor 0x1AF4, device ID 0x1040 + virtio device type, revision 1: a non-transitional device
  (4.1.2.1: "Non-transitional devices SHOULD have a PCI Device ID in the range 0x1040 to
  0x107f ... a PCI Revision ID of 1 or higher ... a PCI Subsystem Device ID of 0x40 or
  higher"); subsystem vendor 0x1AF4, subsystem ID = the device ID. No legacy interface and no
  I/O BAR. Interrupt Pin 0: no INTx (the PCIe host is MSI-only, see the note of issue 12).
- Vendor-specific capabilities (struct virtio_pci_cap, 4.1.4) for COMMON_CFG, NOTIFY_CFG
  (struct virtio_pci_notify_cap), ISR_CFG, DEVICE_CFG (when the device has configuration
  bytes) and PCI_CFG (4.1.4.9, the access window through configuration space), then MSI-X.

BAR layout (both 32-bit memory BARs, non-prefetchable: every structure has side effects)
    BAR 0, 16 KiB, the virtio structures, each in its own 4 KiB page:
      0x0000  common configuration, 0x3C bytes (struct virtio_pci_common_cfg of 1.2)
      0x1000  ISR status, 1 byte
      0x2000  device-specific configuration, the device's config_size bytes (<= 4 KiB)
      0x3000  notifications: queue N at 0x3000 + 4 * N (queue_notify_off = N,
              notify_off_multiplier = 4), so at most 1024 queues
    BAR 2, 4 KiB or more, MSI-X: the table at 0, the PBA right after it (8-byte aligned);
      one vector per queue plus one for configuration changes.
The alignment rules of 4.1.4.x hold: COMMON_CFG and DEVICE_CFG offsets 4-byte aligned,
NOTIFY_CFG 2-byte aligned with an even multiplier, every length within its BAR.

Feature bits: the device offers its own bits 0..23 and may offer VIRTIO_F_INDIRECT_DESC (28)
and VIRTIO_F_EVENT_IDX (29), which the Virtqueue implements; the transport always adds
VIRTIO_F_VERSION_1 (32: 6.1 "A device MUST offer VIRTIO_F_VERSION_1"). VIRTIO_F_RING_RESET
(40) and VIRTIO_F_NOTIFICATION_DATA (38) are not implemented (queue_reset and
queue_notify_data read 0; writes are ignored).

Interrupts (4.1.5): with MSI-X enabled, a queue's used-buffer notification signals the queue's
vector through Msix.signal (a masked vector is latched in the PBA and sent on unmask, by
Msix), VIRTIO_MSI_NO_VECTOR meaning no notification; with MSI-X disabled the ISR's queue bit
is set, and since there is no INTx the driver can only poll it (counted, `intx_less`). A
configuration change notification sets the ISR's configuration bit in both cases (4.1.4.5.1:
"The device MUST set the Device Configuration Interrupt bit in ISR status before sending a
device configuration change notification"). No notification before DRIVER_OK (3.1.2, 2.1.2).

A guest is hostile: configuration-space and BAR accesses of any width at any offset never
raise; common configuration reads are composed byte by byte from the fields they cover (no
field has a read side effect), while a write must have the width of its field (4.1.3.1: "The
driver MUST access each field using the 'natural' access method, i.e. 32-bit accesses for
32-bit fields, etc."; 64-bit fields also as two 32-bit halves) or it is ignored and counted.
Unknown offsets read 0 and ignore writes. Feature selects index a 64-bit feature word, so a
select of 2 or more reads 0 (no shift by a guest-sized amount). Nothing loops on guest data.

Threads: register accesses come from vCPU threads, notify_used / config_changed / needs_reset
from the device's thread; one (reentrant) lock serialises the function's state. The device's
notify and reset are called without it held, so a device may call back in from them or wait
for its thread; config_read and config_write are called with it held (config_changed from
them is fine).
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from typing import Callable, NamedTuple, Protocol

from kvmits.machine.devices.virtio.virtqueue import (MAX_QUEUE_SIZE, Chain, VIRTIO_RING_F_EVENT_IDX,
                                                     VIRTIO_RING_F_INDIRECT_DESC, Virtqueue,
                                                     VirtqueueConfigError, VirtqueueError, VirtqueueStats)
from kvmits.machine.pci.config import PCI_CAP_ID_VNDR, Bar, ConfigSpace
from kvmits.machine.pci.msix import PCI_MSIX_ENTRY_SIZE, Msix, MsixSink
from kvmits.machine.saved_state import StateChecker

log = logging.getLogger(__name__)

# -- PCI IDs (4.1.2) -------------------------------------------------------------------------------
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040       # + virtio device ID (5: 2 = block, 4 = entropy)
VIRTIO_PCI_REVISION = 1                         # non-transitional (4.1.2.1)
#: PCI Code and ID Assignment, base class FFh: "device does not fit any defined class"
PCI_CLASS_OTHER = 0xFF0000

# -- capability types (4.1.4) ----------------------------------------------------------------------
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
# offsets inside struct virtio_pci_cap (4.1.4), from the capability's start
VIRTIO_PCI_CAP_LEN = 2
VIRTIO_PCI_CAP_CFG_TYPE = 3
VIRTIO_PCI_CAP_BAR = 4
VIRTIO_PCI_CAP_ID = 5
VIRTIO_PCI_CAP_OFFSET = 8
VIRTIO_PCI_CAP_LENGTH = 12
VIRTIO_PCI_NOTIFY_CAP_MULT = 16                 # struct virtio_pci_notify_cap (4.1.4.4)
VIRTIO_PCI_CFG_DATA = 16                        # struct virtio_pci_cfg_cap (4.1.4.9)

# -- struct virtio_pci_common_cfg (4.1.4.3), offsets in the structure --------------------------------
VIRTIO_PCI_COMMON_DFSELECT = 0x00               # le32 device_feature_select
VIRTIO_PCI_COMMON_DF = 0x04                     # le32 device_feature (RO)
VIRTIO_PCI_COMMON_GFSELECT = 0x08               # le32 driver_feature_select
VIRTIO_PCI_COMMON_GF = 0x0C                     # le32 driver_feature
VIRTIO_PCI_COMMON_MSIX = 0x10                   # le16 config_msix_vector
VIRTIO_PCI_COMMON_NUMQ = 0x12                   # le16 num_queues (RO)
VIRTIO_PCI_COMMON_STATUS = 0x14                 # u8 device_status
VIRTIO_PCI_COMMON_CFGGENERATION = 0x15          # u8 config_generation (RO)
VIRTIO_PCI_COMMON_Q_SELECT = 0x16               # le16 queue_select
VIRTIO_PCI_COMMON_Q_SIZE = 0x18                 # le16 queue_size
VIRTIO_PCI_COMMON_Q_MSIX = 0x1A                 # le16 queue_msix_vector
VIRTIO_PCI_COMMON_Q_ENABLE = 0x1C               # le16 queue_enable
VIRTIO_PCI_COMMON_Q_NOFF = 0x1E                 # le16 queue_notify_off (RO)
VIRTIO_PCI_COMMON_Q_DESCLO = 0x20               # le64 queue_desc
VIRTIO_PCI_COMMON_Q_DESCHI = 0x24
VIRTIO_PCI_COMMON_Q_AVAILLO = 0x28              # le64 queue_driver
VIRTIO_PCI_COMMON_Q_AVAILHI = 0x2C
VIRTIO_PCI_COMMON_Q_USEDLO = 0x30               # le64 queue_device
VIRTIO_PCI_COMMON_Q_USEDHI = 0x34
VIRTIO_PCI_COMMON_Q_NDATA = 0x38                # le16 queue_notify_data (RO; NOTIFICATION_DATA)
VIRTIO_PCI_COMMON_Q_RESET = 0x3A                # le16 queue_reset (RING_RESET)
VIRTIO_PCI_COMMON_CFG_SIZE = 0x3C

VIRTIO_MSI_NO_VECTOR = 0xFFFF

# -- device status (2.1) ---------------------------------------------------------------------------
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 64
VIRTIO_CONFIG_S_FAILED = 128
#: the bits a driver sets; DEVICE_NEEDS_RESET belongs to the device (2.1.2), 16 and 32 are reserved
DRIVER_STATUS_BITS = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK
                      | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED)

# -- feature bits (6) ------------------------------------------------------------------------------
VIRTIO_F_VERSION_1 = 32
#: the bits a device may offer through this transport: its own (0..23, 6: "Feature bits 0 to 23
#: ... are specific to the device type") and the two ring features the Virtqueue implements
DEVICE_FEATURE_MASK = (1 << 24) - 1 | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX

# -- ISR status (4.1.4.5) --------------------------------------------------------------------------
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

# -- the BAR layout (module docstring) ---------------------------------------------------------------
VIRTIO_BAR = 0
VIRTIO_BAR_SIZE = 0x4000
COMMON_CFG_OFFSET = 0x0000
ISR_CFG_OFFSET = 0x1000
DEVICE_CFG_OFFSET = 0x2000
NOTIFY_CFG_OFFSET = 0x3000
REGION_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MAX_QUEUES = REGION_SIZE // NOTIFY_OFF_MULTIPLIER
MSIX_BAR = 2
MSIX_TABLE_OFFSET = 0

#: the set_needs_reset reason of a queue_enable the Virtqueue refused (VirtqueueConfigError)
QUEUE_CONFIG_REFUSED = "QUEUE_CONFIG_REFUSED"

STATE_FORMAT = "kvmits-virtio-pci"
STATE_VERSION = 1
_CHECK = StateChecker("virtio-pci", STATE_FORMAT, STATE_VERSION)
_STATE_KEYS = ("format", "version", "config", "msix", "regs", "queues", "counters", "needs_reset", "device")
#: the common configuration registers a state carries, and the bound of each (its width: 4.1.4.3)
_REG_LIMITS = {"device_feature_select": 1 << 32, "driver_feature_select": 1 << 32, "driver_features": 1 << 64,
               "config_msix_vector": 1 << 16, "status": 1 << 8, "queue_select": 1 << 16,
               "isr": (VIRTIO_PCI_ISR_QUEUE | VIRTIO_PCI_ISR_CONFIG) + 1, "config_generation": 1 << 8}
_REG_KEYS = (*_REG_LIMITS, "deferred")
_QUEUE_KEYS = ("size", "msix_vector", "enabled", "desc", "driver", "device", "vq")


class VirtioDevice(Protocol):
    """What a virtio device (blk, rng, ...) gives the transport.

    - `device_type`: the virtio device ID (5, e.g. 2 block, 4 entropy);
    - `device_features`: the feature bits it offers (bits 0..23, INDIRECT_DESC, EVENT_IDX;
      VERSION_1 is added by the transport);
    - `queue_max_sizes`: the largest queue size of each queue (powers of two <= 32768), so
      also the number of queues;
    - `config_size`, `config_read(offset, size)`, `config_write(offset, size, value)`: its
      device-specific configuration (5.x.4), accessed only with offset + size <= config_size;
    - `notify(index, virtqueue)`: the driver notified enabled queue `index` (4.1.5.2) after
      DRIVER_OK; the device pops chains from it, pushes them back and calls the function's
      notify_used(index) when virtqueue.needs_interrupt();
    - `reset()`: the driver reset the device (2.4): forget the queues and all state;
    - optionally `pci_class` (24-bit class code, default PCI_CLASS_OTHER).
    """

    device_type: int
    device_features: int
    queue_max_sizes: tuple[int, ...]
    config_size: int

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...

    def notify(self, index: int, virtqueue: Virtqueue) -> None: ...

    def reset(self) -> None: ...


class NotifyAddress(NamedTuple):
    """Where the driver notifies a queue: a `size`-byte write at `offset` of BAR `bar`.
    `datamatch` is None: the address alone names the queue (each queue has its own, the
    multiplier being 4), and bar_write treats any value written there the same, so a
    KVM_IOEVENTFD without datamatch on (BAR base + offset, size) takes exactly the writes that
    bar_write would take as that queue's notification."""

    bar: int
    offset: int
    size: int
    datamatch: int | None


class _Queue:
    """The per-queue registers of the common configuration (4.1.4.3) and its Virtqueue."""

    __slots__ = ("max_size", "size", "msix_vector", "enabled", "desc", "driver", "device", "vq")

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size             # 4.1.4.3.2: "reset ... to the maximum queue size"
        self.msix_vector = VIRTIO_MSI_NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.vq: Virtqueue | None = None


def _vendor_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap after cap_vndr and cap_next (4.1.4): cap_len, cfg_type, bar, id,
    padding[2], offset, length, then `extra` (the notify multiplier, the PCI_CFG data)."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra


class _VirtioConfigSpace(ConfigSpace):
    """ConfigSpace plus the VIRTIO_PCI_CAP_PCI_CFG window (4.1.4.9), which needs reads with a
    side effect: "Upon detecting driver read access to pci_cfg_data, the device MUST execute a
    read access of length cap.length at offset cap.offset at BAR selected by cap.bar and store
    the first cap.length bytes in pci_cfg_data", and likewise a write access after a write.
    cap.length other than 1, 2, 4, an offset not aligned to it, a BAR the function lacks or
    a range past its end make pci_cfg_data a plain scratch register (4.1.4.9.1: the driver
    MUST NOT write such values)."""

    function: VirtioPciFunction
    pci_cfg: int = -1             # the capability's offset, once added

    def _window(self) -> tuple[int, int, int] | None:
        base = self.pci_cfg
        bar = self.data[base + VIRTIO_PCI_CAP_BAR]
        offset, length = struct.unpack_from("<II", self.data, base + VIRTIO_PCI_CAP_OFFSET)
        if length not in (1, 2, 4) or offset % length or bar not in self.bars \
                or offset + length > self.bars[bar].size:
            return None
        return bar, offset, length

    def _touches_data(self, offset: int, size: int) -> bool:
        start = self.pci_cfg + VIRTIO_PCI_CFG_DATA
        return self.pci_cfg >= 0 and offset < start + 4 and start < offset + size

    def read(self, offset: int, size: int) -> int:
        if size > 0 and self._touches_data(offset, size):
            window = self._window()
            if window is not None:
                bar, bar_offset, length = window
                value = self.function.bar_read(-1, bar, bar_offset, length)
                at = self.pci_cfg + VIRTIO_PCI_CFG_DATA
                self.data[at:at + length] = value.to_bytes(length, "little")
        return super().read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.function._lock:        # MSI-X Enable / Function Mask against signal()
            super().write(offset, size, value)
        if size > 0 and self._touches_data(offset, size):
            window = self._window()
            if window is not None:
                bar, bar_offset, length = window
                at = self.pci_cfg + VIRTIO_PCI_CFG_DATA
                self.function.bar_write(-1, bar, bar_offset, length,
                                        int.from_bytes(self.data[at:at + length], "little"))


class VirtioPciFunction:
    """A virtio device on PCI (4.1): `device` (a VirtioDevice), `memory` the guest memory its
    virtqueues live in (read(gpa, size) / write(gpa, data), GuestMemoryError outside RAM),
    `sink` where its MSI-X messages go. Give it to PciHost.add().

    Counters (guest mistakes, each also logged the first time): `bad_accesses` (writes of the
    wrong width, or to read-only or unknown registers), `dropped_notifies` (a notify for a
    queue that does not exist or is not enabled), `deferred_notifies` (a notify before
    DRIVER_OK: every enabled queue is notified when DRIVER_OK is set), `refused_features`
    (FEATURES_OK refused), `bad_queue_sizes`, `intx_less` (notifications that could only set
    the ISR, there being no INTx), `no_vector` (notifications dropped for
    VIRTIO_MSI_NO_VECTOR), `needs_reset` (reason -> times DEVICE_NEEDS_RESET was set)."""

    def __init__(self, device: VirtioDevice, memory, sink: MsixSink, *, name: str = "virtio-pci"):
        sizes = tuple(device.queue_max_sizes)
        if not 1 <= len(sizes) <= MAX_QUEUES:
            raise ValueError(f"a virtio-pci device has 1..{MAX_QUEUES} queues here, not {len(sizes)}")
        for size in sizes:
            if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
                raise ValueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE} (2.7)")
        if not 0 <= device.config_size <= REGION_SIZE:
            raise ValueError(f"device configuration of {device.config_size} bytes does not fit {REGION_SIZE:#x}")
        if device.device_features & ~DEVICE_FEATURE_MASK:
            raise ValueError(f"features {device.device_features & ~DEVICE_FEATURE_MASK:#x} are not "
                             "implemented by this transport")
        self.device = device
        self.memory = memory
        self.name = name
        #: what the device offers (6: VERSION_1 always)
        self.device_features = device.device_features | 1 << VIRTIO_F_VERSION_1
        self.stats = VirtqueueStats()
        self.queues = [_Queue(size) for size in sizes]
        self._lock = threading.RLock()

        device_id = VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device.device_type
        # one vector per queue and one for configuration changes (4.1.4.3), unless the device
        # asks for fewer: kvmits.machine.devices.virtio.blk's msix_vectors
        vectors = getattr(device, "msix_vectors", None) or len(sizes) + 1
        if not 1 <= vectors <= len(sizes) + 1:
            raise ValueError(f"{vectors} MSI-X vectors for {len(sizes)} queues: 1..{len(sizes) + 1}")
        pba = MSIX_TABLE_OFFSET + vectors * PCI_MSIX_ENTRY_SIZE
        msix_bar_size = 0x1000
        while msix_bar_size < pba + Msix.pba_size_for(vectors):
            msix_bar_size *= 2
        config = _VirtioConfigSpace(VIRTIO_PCI_VENDOR_ID, device_id, getattr(device, "pci_class", PCI_CLASS_OTHER),
                                    revision=VIRTIO_PCI_REVISION, subsystem_vendor=VIRTIO_PCI_VENDOR_ID,
                                    subsystem=device_id,
                                    bars=(Bar(VIRTIO_BAR, VIRTIO_BAR_SIZE), Bar(MSIX_BAR, msix_bar_size)))
        config.function = self
        self.config: ConfigSpace = config
        #: capability offsets in configuration space, by cfg_type
        self.caps: dict[int, int] = {}
        add = lambda cfg_type, body, wmask=None: self.caps.__setitem__(     # noqa: E731
            cfg_type, config.add_capability(PCI_CAP_ID_VNDR, body, wmask))
        add(VIRTIO_PCI_CAP_COMMON_CFG, _vendor_cap(VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_BAR, COMMON_CFG_OFFSET,
                                                   VIRTIO_PCI_COMMON_CFG_SIZE))
        add(VIRTIO_PCI_CAP_NOTIFY_CFG, _vendor_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_BAR, NOTIFY_CFG_OFFSET,
                                                   len(sizes) * NOTIFY_OFF_MULTIPLIER,
                                                   struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        add(VIRTIO_PCI_CAP_ISR_CFG, _vendor_cap(VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_BAR, ISR_CFG_OFFSET, 1))
        if device.config_size:
            add(VIRTIO_PCI_CAP_DEVICE_CFG, _vendor_cap(VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_BAR, DEVICE_CFG_OFFSET,
                                                       device.config_size))
        # PCI_CFG: bar, offset, length and pci_cfg_data are the driver's (4.1.4.9)
        add(VIRTIO_PCI_CAP_PCI_CFG, _vendor_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, bytes(4)),
            bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12)
        config.pci_cfg = self.caps[VIRTIO_PCI_CAP_PCI_CFG]
        self.msix = Msix(config, vectors, MSIX_BAR, MSIX_TABLE_OFFSET, pba, sink)

        self.bad_accesses = 0
        self.dropped_notifies = 0
        self.deferred_notifies = 0
        self.refused_features = 0
        self.bad_queue_sizes = 0
        self.intx_less = 0
        self.no_vector = 0
        self.needs_reset: collections.Counter[str] = collections.Counter()
        self._logged: set[str] = set()
        self.config_generation = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.status = 0
        self.queue_select = 0
        self.isr = 0
        self._deferred: set[int] = set()
        for q in self.queues:
            q.reset()

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s: " + msg + " (logged once)", self.name, *args)

    # -- state the device and the VMM read -------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return len(self.queues)

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK)

    def negotiated(self, bit: int) -> bool:
        """Whether feature `bit` was offered and accepted (meaningful from FEATURES_OK on)."""
        return bool((self.driver_features & self.device_features) >> bit & 1)

    def queue(self, index: int) -> Virtqueue | None:
        """The Virtqueue of enabled queue `index`, None otherwise."""
        return self.queues[index].vq if 0 <= index < len(self.queues) else None

    def notify_address(self, index: int) -> NotifyAddress:
        """Where the driver notifies queue `index` (4.1.4.4: cap.offset + queue_notify_off *
        notify_off_multiplier; a 2-byte write of the queue index, 4.1.5.2), for a VMM's
        KVM_IOEVENTFD at config.bar_address(bar) + offset, whose eventfd thread then calls
        notify_queue(index). Raises IndexError for a queue the device does not have (a VMM bug)."""
        if not 0 <= index < len(self.queues):
            raise IndexError(f"{self.name} has no queue {index}")
        return NotifyAddress(VIRTIO_BAR, NOTIFY_CFG_OFFSET + index * NOTIFY_OFF_MULTIPLIER, 2, None)

    # -- save and restore (issue 13) -------------------------------------------------------------
    #: the guest-mistake counters a state carries, so they count over the guest's whole life
    _COUNTERS = ("bad_accesses", "dropped_notifies", "deferred_notifies", "refused_features", "bad_queue_sizes",
                 "intx_less", "no_vector")

    def save_state(self) -> dict:
        """The function's state as a JSON-able dict: configuration space (BARs, command, MSI-X
        Message Control), the MSI-X table and PBA, the common configuration registers, each
        queue's registers and, for an enabled queue, its Virtqueue's cursors, the ISR, the
        counters, and the device's own state (device.save_state(), for a device that has one).
        The caller makes sure no notify is being served (the machine's device threads paused,
        the vCPUs too): a queue in the middle of a request would be saved half-way."""
        with self._lock:
            return {
                "format": STATE_FORMAT, "version": STATE_VERSION,
                "config": self.config.save_state(),
                "msix": self.msix.save_state(),
                "regs": {"device_feature_select": self.device_feature_select,
                         "driver_feature_select": self.driver_feature_select,
                         "driver_features": self.driver_features, "config_msix_vector": self.config_msix_vector,
                         "status": self.status, "queue_select": self.queue_select, "isr": self.isr,
                         "config_generation": self.config_generation, "deferred": sorted(self._deferred)},
                "queues": [{"size": q.size, "msix_vector": q.msix_vector, "enabled": q.enabled, "desc": q.desc,
                            "driver": q.driver, "device": q.device,
                            "vq": None if q.vq is None else q.vq.save_state()} for q in self.queues],
                "counters": {name: getattr(self, name) for name in self._COUNTERS},
                "needs_reset": dict(self.needs_reset),
                "device": self.device.save_state() if hasattr(self.device, "save_state") else None,
            }

    def load_state(self, state) -> None:
        """Apply a save_state() dict to this function, built for the same device and not yet
        used by a guest. The dict is not trusted (it may come from a file a user edited): every
        field is checked first (ValueError naming it; nothing changes), including that the
        configuration space's read-only bytes are this function's (the same device) and that
        each enabled queue is one the Virtqueue accepts; then it is applied: registers, queues
        (their Virtqueues made with the saved addresses, negotiated ring features and cursors),
        config space, MSI-X (whose unmasked vectors are routed again: the new VM's MSI routes),
        the device's own state. No watch fires: the caller maps the BARs (PciHost.reload) and
        then, once the vCPUs run, resumes the queues (resume_queues)."""
        with self._lock:
            _CHECK.header(state, _STATE_KEYS)
            regs = _CHECK.fields(state["regs"], _REG_KEYS, "regs")
            values = {k: _CHECK.int(regs[k], f"regs.{k}", limit) for k, limit in _REG_LIMITS.items()}
            if values["driver_features"] & ~self.device_features and values["status"] & VIRTIO_CONFIG_S_FEATURES_OK:
                raise _CHECK.error("regs.driver_features has bits the device does not offer, with FEATURES_OK")
            if values["status"] & ~(DRIVER_STATUS_BITS | VIRTIO_CONFIG_S_NEEDS_RESET):
                raise _CHECK.error(f"regs.status {values['status']:#x} has reserved bits")
            if values["config_msix_vector"] not in (VIRTIO_MSI_NO_VECTOR, *range(self.msix.vectors)):
                raise _CHECK.error(f"regs.config_msix_vector {values['config_msix_vector']} is not a vector "
                                   f"of this function")
            deferred = _CHECK.list(regs["deferred"], "regs.deferred", len(self.queues))
            deferred = {_CHECK.int(i, "regs.deferred[]", len(self.queues)) for i in deferred}
            saved_queues = _CHECK.list(state["queues"], "queues", len(self.queues))
            if len(saved_queues) != len(self.queues):
                raise _CHECK.error(f"queues: {len(saved_queues)} saved, the device has {len(self.queues)}")
            features = values["driver_features"] & self.device_features
            queues = [self._check_queue(i, q, saved, features) for i, (q, saved) in
                      enumerate(zip(self.queues, saved_queues))]
            counters = _CHECK.fields(state["counters"], self._COUNTERS, "counters")
            counters = {k: _CHECK.int(v, f"counters.{k}", 1 << 64) for k, v in counters.items()}
            needs_reset = state["needs_reset"]
            if not isinstance(needs_reset, dict) or len(needs_reset) > len(VirtqueueError) + 8:
                raise _CHECK.error("needs_reset must be a dict of reason -> count")
            needs_reset = {str(k): _CHECK.int(v, f"needs_reset.{k}", 1 << 64) for k, v in needs_reset.items()}
            self.config.check_state(state["config"])
            self.msix.check_state(state["msix"])
            device_state = state["device"]
            if (device_state is None) != (not hasattr(self.device, "load_state")):
                raise _CHECK.error("device: the saved device state does not match the device")
            if device_state is not None:
                self.device.load_state(device_state)        # checked first, then applied
            # everything checked: apply
            for name, value in values.items():
                setattr(self, name, value)
            self._deferred = deferred
            for q, (size, vector, enabled, desc, driver, device, vq) in zip(self.queues, queues):
                q.size, q.msix_vector, q.enabled, q.desc, q.driver, q.device, q.vq = \
                    size, vector, enabled, desc, driver, device, vq
            for name, value in counters.items():
                setattr(self, name, value)
            self.needs_reset = collections.Counter(needs_reset)
            self.config.load_state(state["config"])
            self.msix.load_state(state["msix"])

    def _check_queue(self, index: int, q: _Queue, saved, features: int) -> tuple:
        what = f"queues[{index}]"
        _CHECK.fields(saved, _QUEUE_KEYS, what)
        size = _CHECK.int(saved["size"], f"{what}.size", q.max_size + 1)
        if size == 0 or size & (size - 1):
            raise _CHECK.error(f"{what}.size {size} is not a power of 2 (2.7)")
        vector = _CHECK.int(saved["msix_vector"], f"{what}.msix_vector", 1 << 16)
        if vector != VIRTIO_MSI_NO_VECTOR and vector >= self.msix.vectors:
            raise _CHECK.error(f"{what}.msix_vector {vector} is not a vector of this function")
        desc, driver, device = (_CHECK.int(saved[k], f"{what}.{k}", 1 << 64) for k in ("desc", "driver", "device"))
        enabled = saved["enabled"]
        if type(enabled) is not bool:
            raise _CHECK.error(f"{what}.enabled must be a bool, not {enabled!r}")
        if enabled != (saved["vq"] is not None):
            raise _CHECK.error(f"{what}: an enabled queue has a virtqueue state, a disabled one none")
        vq = None
        if enabled:
            try:
                vq = Virtqueue(self.memory, size, desc, driver, device,
                               event_idx=bool(features >> VIRTIO_RING_F_EVENT_IDX & 1),
                               indirect_desc=bool(features >> VIRTIO_RING_F_INDIRECT_DESC & 1),
                               stats=self.stats, name=f"{self.name}.{index}")
                vq.load_state(saved["vq"])
            except ValueError as e:         # VirtqueueConfigError, or a malformed cursor state
                raise _CHECK.error(f"{what}: {e}") from None
        return size, vector, enabled, desc, driver, device, vq

    def resume_queues(self) -> list[int]:
        """After a restore, once the vCPUs run: the enabled queues of a driver past DRIVER_OK,
        each sent a used-buffer notification (notify_used) and returned, for the caller to
        notify them (their eventfds). A notification the source's device thread took but had
        not served, or an MSI whose irqfd injection KVM had not finished (irqfd_wakeup may
        defer it to a work item), would otherwise be lost, and the driver wait for it for ever;
        a spurious one is harmless (the driver or the device finds nothing new: 2.7.13, 2.7.14)."""
        with self._lock:
            if not self.driver_ok:
                return []
            active = [i for i, q in enumerate(self.queues) if q.vq is not None and q.vq.broken is None]
        for index in active:
            self.notify_used(index)
        return active

    # -- the device's side ------------------------------------------------------------------------
    def notify_queue(self, index: int) -> bool:
        """The driver notified queue `index` (a notify write, or its ioeventfd): call the
        device's notify for an enabled queue after DRIVER_OK. A queue that does not exist or
        is not enabled: counted and dropped. Before DRIVER_OK: counted and deferred (3.1.2:
        the device MUST NOT consume buffers before DRIVER_OK; they are looked at when it is
        set). Returns whether the device was called."""
        with self._lock:
            vq = self.queue(index)
            if vq is None:
                self.dropped_notifies += 1
                self._warn_once("notify", "notify for queue %d, which %s", index,
                                "is not enabled" if 0 <= index < len(self.queues) else "does not exist")
                return False
            if not self.driver_ok:
                self.deferred_notifies += 1
                self._deferred.add(index)
                return False
        self.device.notify(index, vq)
        return True

    def notify_used(self, index: int) -> bool:
        """Send queue `index`'s used buffer notification (2.7.7, 4.1.5.4): the queue's MSI-X
        vector while MSI-X is enabled (none for VIRTIO_MSI_NO_VECTOR), else the ISR's queue
        bit (4.1.4.5.1) with no INTx to raise. Nothing before DRIVER_OK or for a queue that is
        not enabled. The device calls it when Virtqueue.needs_interrupt() says so. Returns
        whether an MSI was sent (not latched)."""
        with self._lock:
            if not self.driver_ok or self.queue(index) is None:
                return False
            if self.msix.enabled:
                vector = self.queues[index].msix_vector
                if vector == VIRTIO_MSI_NO_VECTOR:
                    self.no_vector += 1
                    return False
                return self.msix.signal(vector)
            self.isr |= VIRTIO_PCI_ISR_QUEUE
            self.intx_less += 1
            return False

    def config_changed(self) -> bool:
        """The device changed its device-specific configuration (4.1.4.3.1: config_generation
        changes; 4.1.5.3: a configuration change notification, the ISR's configuration bit
        first (4.1.4.5.1), then config_msix_vector while MSI-X is enabled). Notifications
        only after DRIVER_OK. Returns whether an MSI was sent (not latched)."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            return self._config_interrupt()

    def _config_interrupt(self) -> bool:
        if not self.driver_ok:
            return False
        self.isr |= VIRTIO_PCI_ISR_CONFIG
        if self.msix.enabled:
            if self.config_msix_vector == VIRTIO_MSI_NO_VECTOR:
                self.no_vector += 1
                return False
            return self.msix.signal(self.config_msix_vector)
        self.intx_less += 1
        return False

    def serve(self, index: int, vq: Virtqueue, handle: Callable[[Chain], int]) -> None:
        """What a device's notify(index, vq) does with the queue: serve it in rounds of at most
        vq.size chains, driver notifications off meanwhile (2.7.10), another round only while
        the queue has more (the cap was reached, or enable_notifications() saw buffers that came
        meanwhile), so a notify lasts as long as the driver keeps the queue fed and no longer.
        `handle(chain)` does one request and returns how many bytes it wrote into the chain's
        device-writable buffers (2.7.8 used length), or -1 when the request cannot be completed
        (the device set DEVICE_NEEDS_RESET): that chain is not returned and serving stops. A
        queue error sets DEVICE_NEEDS_RESET; a queue a reset took away meanwhile is left alone.
        The used-buffer notification goes out after each round (notify_used)."""
        while self._serve_round(index, vq, handle):
            pass

    def _serve_round(self, index: int, vq: Virtqueue, handle: Callable[[Chain], int]) -> bool:
        if self.queue(index) is not vq:
            return False                    # reset meanwhile: the ring is no longer the device's
        err = vq.disable_notifications()
        if err is not None:
            self.set_needs_reset(err, vq.broken_detail, index)
            return False
        more = True                         # unless the queue runs dry below
        for _ in range(vq.size):
            chain = vq.pop()
            if chain is None:
                more = False
                break
            if chain.__class__ is VirtqueueError:
                self.set_needs_reset(chain, vq.broken_detail, index)
                return False
            written = handle(chain)
            if written < 0 or self.queue(index) is not vq:
                more = None                 # stopped, or reset meanwhile: no push, no more
                break
            err = vq.push(chain.head, written)
            if err is not None:
                self.set_needs_reset(err, vq.broken_detail, index)
                return False
        if vq.needs_interrupt():
            self.notify_used(index)
        if more is None:
            return False
        if more:
            return True                     # the cap: more may be waiting, notifications still off
        more = vq.enable_notifications()
        if more.__class__ is VirtqueueError:
            self.set_needs_reset(more, vq.broken_detail, index)
            return False
        return more

    def set_needs_reset(self, reason: VirtqueueError | str, detail: str = "", queue: int | None = None) -> None:
        """The device met an error it cannot recover from without a reset (a Virtqueue's
        VirtqueueError, a config the driver set up wrong): set DEVICE_NEEDS_RESET (2.1.2: "The
        device SHOULD set DEVICE_NEEDS_RESET when it enters an error state that a reset is
        needed. If DRIVER_OK is set, after it sets DEVICE_NEEDS_RESET, the device MUST send a
        device configuration change notification"). Counted per reason (a VirtqueueError's
        name, or a short fixed string: `detail` carries the particulars), logged once each, so
        a guest that breaks its device in a loop cannot flood the log."""
        why = reason.name if isinstance(reason, VirtqueueError) else str(reason)
        with self._lock:
            self.needs_reset[why] += 1
            self._warn_once("needs-reset " + why, "DEVICE_NEEDS_RESET%s: %s%s",
                            "" if queue is None else f" (queue {queue})",
                            reason.value if isinstance(reason, VirtqueueError) else reason,
                            f" ({detail})" if detail else "")
            if self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
                return
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
            self._config_interrupt()

    # -- BAR accesses (PciFunction; never raise) ----------------------------------------------------
    def bar_read(self, vcpu: int, bar: int, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset < 0:
            return 0
        if bar == MSIX_BAR:
            if offset + size > self.config.bars[MSIX_BAR].size:
                return 0
            with self._lock:
                return self.msix.bar_read(offset, size)
        if bar != VIRTIO_BAR:
            return 0
        region, rel = divmod(offset, REGION_SIZE)
        if rel + size > REGION_SIZE:
            return 0                                     # straddles two structures
        with self._lock:
            if region == COMMON_CFG_OFFSET // REGION_SIZE:
                return self._common_read(rel, size)
            if region == ISR_CFG_OFFSET // REGION_SIZE:
                if rel:
                    return 0
                value, self.isr = self.isr, 0            # 4.1.4.5: "cleared upon read"
                return value
            if region == DEVICE_CFG_OFFSET // REGION_SIZE:
                if rel + size > self.device.config_size:
                    return 0
                return self.device.config_read(rel, size) & ((1 << 8 * size) - 1)
        return 0                                         # notifications are write-only

    def bar_write(self, vcpu: int, bar: int, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or offset < 0:
            return
        value &= (1 << 8 * size) - 1
        if bar == MSIX_BAR:
            if offset + size <= self.config.bars[MSIX_BAR].size:
                with self._lock:                         # against signal() from the device thread:
                    self.msix.bar_write(offset, size, value)    # an unmask must not miss a latch
            return
        if bar != VIRTIO_BAR:
            return
        region, rel = divmod(offset, REGION_SIZE)
        if rel + size > REGION_SIZE:
            return
        if region == NOTIFY_CFG_OFFSET // REGION_SIZE:
            index, misaligned = divmod(rel, NOTIFY_OFF_MULTIPLIER)
            if misaligned:
                with self._lock:
                    self.dropped_notifies += 1
                return
            self.notify_queue(index)                     # the address names the queue (4.1.4.4)
            return
        if region == COMMON_CFG_OFFSET // REGION_SIZE:
            self._common_write(rel, size, value)
        elif region == DEVICE_CFG_OFFSET // REGION_SIZE:
            with self._lock:
                if rel + size <= self.device.config_size:
                    self.device.config_write(rel, size, value)
        # the ISR is read-only; the rest of the BAR is nothing

    # -- struct virtio_pci_common_cfg (4.1.4.3) ------------------------------------------------------
    #: field offset -> width, for the width check of writes and the byte composition of reads
    _FIELDS = {0x00: 4, 0x04: 4, 0x08: 4, 0x0C: 4, 0x10: 2, 0x12: 2, 0x14: 1, 0x15: 1, 0x16: 2, 0x18: 2,
               0x1A: 2, 0x1C: 2, 0x1E: 2, 0x20: 4, 0x24: 4, 0x28: 4, 0x2C: 4, 0x30: 4, 0x34: 4, 0x38: 2, 0x3A: 2}
    _FIELD_AT = {o + i: o for o, w in _FIELDS.items() for i in range(w)}

    def _selected(self) -> _Queue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _field(self, offset: int) -> int:
        """The value of the common configuration field at `offset` (64-bit fields by half)."""
        q = self._selected()
        if offset == VIRTIO_PCI_COMMON_DFSELECT:
            return self.device_feature_select
        if offset == VIRTIO_PCI_COMMON_DF:
            sel = self.device_feature_select
            return self.device_features >> 32 * sel & 0xFFFF_FFFF if sel < 2 else 0
        if offset == VIRTIO_PCI_COMMON_GFSELECT:
            return self.driver_feature_select
        if offset == VIRTIO_PCI_COMMON_GF:
            sel = self.driver_feature_select
            return self.driver_features >> 32 * sel & 0xFFFF_FFFF if sel < 2 else 0
        if offset == VIRTIO_PCI_COMMON_MSIX:
            return self.config_msix_vector
        if offset == VIRTIO_PCI_COMMON_NUMQ:
            return len(self.queues)
        if offset == VIRTIO_PCI_COMMON_STATUS:
            return self.status
        if offset == VIRTIO_PCI_COMMON_CFGGENERATION:
            return self.config_generation
        if offset == VIRTIO_PCI_COMMON_Q_SELECT:
            return self.queue_select
        if q is None:
            return 0                        # 4.1.4.3.2: queue_size 0 for a queue that is not there
        if offset == VIRTIO_PCI_COMMON_Q_SIZE:
            return q.size
        if offset == VIRTIO_PCI_COMMON_Q_MSIX:
            return q.msix_vector
        if offset == VIRTIO_PCI_COMMON_Q_ENABLE:
            return int(q.enabled)
        if offset == VIRTIO_PCI_COMMON_Q_NOFF:
            return self.queue_select        # queue N notifies at N * multiplier
        if VIRTIO_PCI_COMMON_Q_DESCLO <= offset < VIRTIO_PCI_COMMON_Q_NDATA:
            full = (q.desc, q.driver, q.device)[(offset - VIRTIO_PCI_COMMON_Q_DESCLO) // 8]
            return full >> 32 if offset & 4 else full & 0xFFFF_FFFF
        return 0                            # queue_notify_data, queue_reset: not implemented

    def _common_read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            field = self._FIELD_AT.get(offset + i)
            if field is not None:
                value |= (self._field(field) >> 8 * (offset + i - field) & 0xFF) << 8 * i
        return value

    def _common_write(self, offset: int, size: int, value: int) -> None:
        width = self._FIELDS.get(offset)
        is_64 = VIRTIO_PCI_COMMON_Q_DESCLO <= offset < VIRTIO_PCI_COMMON_Q_NDATA
        if size == 8 and is_64 and offset % 8 == 0:      # a whole 64-bit field at once
            self._common_write(offset, 4, value & 0xFFFF_FFFF)
            self._common_write(offset + 4, 4, value >> 32)
            return
        with self._lock:
            if width != size:
                self._bad(f"a {size}-byte write at common configuration offset {offset:#x}")
                return
            then = self._common_write_field(offset, value)
            deferred, self._deferred = (sorted(self._deferred), set()) if then == "driver_ok" else ((), self._deferred)
        if then == "reset":
            self.device.reset()
        for index in deferred:                           # the notifies deferred before DRIVER_OK
            self.notify_queue(index)

    def _bad(self, what: str) -> None:
        self.bad_accesses += 1
        self._warn_once("bad access", "ignored %s", what)

    def _common_write_field(self, offset: int, value: int):
        """One write of a whole field. Returns "reset" when the device must be reset,
        "driver_ok" when DRIVER_OK was set (the caller acts on both without the lock)."""
        if offset == VIRTIO_PCI_COMMON_DFSELECT:
            self.device_feature_select = value
        elif offset == VIRTIO_PCI_COMMON_GFSELECT:
            self.driver_feature_select = value
        elif offset == VIRTIO_PCI_COMMON_GF:
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK or self.driver_feature_select >= 2:
                # features are fixed once FEATURES_OK is set (3.1.1, step 5), and there are 64
                self._bad(f"a driver_feature write with select {self.driver_feature_select} "
                          f"{'after FEATURES_OK' if self.status & VIRTIO_CONFIG_S_FEATURES_OK else ''}")
                return None
            shift = 32 * self.driver_feature_select
            self.driver_features = self.driver_features & ~(0xFFFF_FFFF << shift) | value << shift
        elif offset == VIRTIO_PCI_COMMON_MSIX:
            self.config_msix_vector = self._vector(value)
        elif offset == VIRTIO_PCI_COMMON_STATUS:
            return self._write_status(value)
        elif offset == VIRTIO_PCI_COMMON_Q_SELECT:
            self.queue_select = value
        elif offset in (VIRTIO_PCI_COMMON_Q_SIZE, VIRTIO_PCI_COMMON_Q_MSIX, VIRTIO_PCI_COMMON_Q_ENABLE) \
                or VIRTIO_PCI_COMMON_Q_DESCLO <= offset < VIRTIO_PCI_COMMON_Q_NDATA:
            self._write_queue(offset, value)
        else:                                            # device_feature, num_queues, ...: read-only
            self._bad(f"a write to read-only common configuration offset {offset:#x}")
        return None

    def _vector(self, value: int) -> int:
        """4.1.5.1.2: a vector the function does not have cannot be mapped, and "the device
        MUST ... return VIRTIO_MSI_NO_VECTOR" on reading the field back."""
        return value if value < self.msix.vectors else VIRTIO_MSI_NO_VECTOR

    def _write_status(self, value: int):
        if value == 0:
            # 2.4 / 4.1.4.3.2: writing 0 resets the device; reads 0 once done (synchronous here)
            self._reset_registers()
            return "reset"
        old = self.status
        new = value & DRIVER_STATUS_BITS | old & VIRTIO_CONFIG_S_NEEDS_RESET
        if new & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
            unoffered = self.driver_features & ~self.device_features
            if unoffered or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                # 3.1.1 step 6: the device refuses by leaving FEATURES_OK clear; a modern-only
                # device may refuse a driver without VERSION_1 (6.1)
                new &= ~VIRTIO_CONFIG_S_FEATURES_OK
                self.refused_features += 1
                self._warn_once("features", "FEATURES_OK refused: driver features %#x, offered %#x",
                                self.driver_features, self.device_features)
        self.status = new
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
            return "driver_ok"
        return None

    def _write_queue(self, offset: int, value: int) -> None:
        q = self._selected()
        if q is None:
            self._bad(f"a queue register write with queue_select {self.queue_select}")
            return
        if offset == VIRTIO_PCI_COMMON_Q_MSIX:
            q.msix_vector = self._vector(value)
            return
        if q.enabled:
            # 4.1.4.3.2: the driver configures a queue before enabling it, and never writes 0
            # to queue_enable (only a reset, or RING_RESET which is not offered, disables it)
            self._bad(f"a write at common configuration offset {offset:#x} of enabled queue {self.queue_select}")
            return
        if offset == VIRTIO_PCI_COMMON_Q_SIZE:
            if not 1 <= value <= q.max_size or value & (value - 1):
                # 2.7: a power of 2; 4.1.4.3.2: at most the maximum the device presented
                self.bad_queue_sizes += 1
                self._warn_once("queue size", "ignored queue_size %d for queue %d (max %d)",
                                value, self.queue_select, q.max_size)
                return
            q.size = value
        elif offset == VIRTIO_PCI_COMMON_Q_ENABLE:
            if value == 1:
                self._enable(self.queue_select, q)
            else:
                self._bad(f"queue_enable = {value}")
        else:
            which = ("desc", "driver", "device")[(offset - VIRTIO_PCI_COMMON_Q_DESCLO) // 8]
            old = getattr(q, which)
            new = old & 0xFFFF_FFFF | value << 32 if offset & 4 else old & ~0xFFFF_FFFF | value
            setattr(q, which, new)

    def _enable(self, index: int, q: _Queue) -> None:
        """queue_enable = 1: the queue's Virtqueue from its registers and the negotiated ring
        features (2.7.5.3 INDIRECT_DESC, 2.7.7/2.7.10 EVENT_IDX). A configuration the Virtqueue
        refuses (VirtqueueConfigError: alignment, 2.7) leaves the queue disabled and sets
        DEVICE_NEEDS_RESET."""
        try:
            q.vq = Virtqueue(self.memory, q.size, q.desc, q.driver, q.device,
                             event_idx=self.negotiated(VIRTIO_RING_F_EVENT_IDX),
                             indirect_desc=self.negotiated(VIRTIO_RING_F_INDIRECT_DESC),
                             stats=self.stats, name=f"{self.name}.{index}")
        except VirtqueueConfigError as e:
            self.set_needs_reset(QUEUE_CONFIG_REFUSED, str(e), index)
            return
        q.enabled = True
