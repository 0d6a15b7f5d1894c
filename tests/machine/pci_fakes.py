"""Test doubles shared by the PCI, MSI-X and virtio-pci tests."""


class RecordingMsixSink:
    """A kvmits.machine.pci.MsixSink that records ("route", vector, address, data) and
    ("fire", vector) in `calls`, in order."""

    def __init__(self):
        self.calls = []

    def route(self, vector, address, data):
        self.calls.append(("route", vector, address, data))

    def fire(self, vector):
        self.calls.append(("fire", vector))
