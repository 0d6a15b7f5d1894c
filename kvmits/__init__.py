"""kvmits: drive arm64 KVM's vGICv3 and a GICv3 ITS (in-kernel or in Python) from Python.

Layers import downward only: uapi -> kvm -> gic / its -> machine -> cli.
See ../shared/DESIGN.md and docs/ for the map.
"""

__version__ = "0.1.0"
