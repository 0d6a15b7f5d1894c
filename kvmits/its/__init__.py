"""The userspace ITS model: a GICv3 ITS in pure Python, independent of KVM.

    from kvmits.its import ItsModel, ItsConfig, RecordingSink

    its = ItsModel(memory, sink=RecordingSink(), redistributors=4)
    its.mmio_write(GITS_CBASER, 8, cbaser)      # a guest programs it through MMIO ...
    its.signal_msi(devid, eventid)              # ... and devices send MSIs

Modules: model (ItsModel), config (ItsConfig and the policy enums), interfaces (the
GuestMemory / LpiSink / RedistributorView protocols, RecordingSink, NullSink,
Redistributors), registers (GITS_* offsets and fields), commands (command numbers, error
codes, encoders), abi (KVM's ITS table ABI rev 0). See docs/its-model.md.
"""

from kvmits.its.abi import ItsTableError, read_tables, write_tables
from kvmits.its.config import (
    CollectionUnmap, CwriterOutOfRange, ErrorPolicy, ItsConfig, MapdRemap, MaptiOverwrite,
)
from kvmits.its.interfaces import (
    GuestMemory, LpiSink, NullSink, RecordingSink, RedistributorView, Redistributors,
)
from kvmits.its.model import (
    MISS_COLLECTION_UNMAPPED, MISS_DEVICE_UNMAPPED, MISS_EVENT_OUT_OF_RANGE, MISS_ITS_DISABLED,
    MISS_NO_ITE, TRANSLATED, BadAccess, CommandError, ItsModel, MappingChange, Translation,
)

__all__ = [
    "ItsModel", "ItsConfig", "ErrorPolicy", "CwriterOutOfRange", "MaptiOverwrite", "MapdRemap",
    "CollectionUnmap", "GuestMemory", "LpiSink", "RedistributorView", "Redistributors",
    "NullSink", "RecordingSink", "Translation", "MappingChange", "CommandError", "BadAccess",
    "TRANSLATED", "MISS_ITS_DISABLED", "MISS_DEVICE_UNMAPPED", "MISS_EVENT_OUT_OF_RANGE",
    "MISS_NO_ITE", "MISS_COLLECTION_UNMAPPED", "ItsTableError", "read_tables", "write_tables",
]
