"""PCI Express for kvmits machines: a function's configuration space (config), MSI-X (msix) and
the ECAM host bridge that serves bus 0 and maps the functions' BARs (host). Devices on it come
next (virtio-pci, issue 12)."""

from kvmits.machine.pci.config import Bar, ConfigSpace
from kvmits.machine.pci.host import PciHost
from kvmits.machine.pci.msix import Msix, MsixSink

__all__ = ["Bar", "ConfigSpace", "Msix", "MsixSink", "PciHost"]
