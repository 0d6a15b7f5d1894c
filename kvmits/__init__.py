"""kvmits: drive arm64 KVM's vGICv3 and a GICv3 ITS (in-kernel or in Python) from Python.

Layers import downward only: uapi -> kvm -> its / gic -> machine -> lab -> bench / cli.
docs/DEVELOPING.md has the map of the packages; README.md the way in.
"""

__version__ = "0.1.0"
