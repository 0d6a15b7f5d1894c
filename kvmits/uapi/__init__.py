"""The KVM UAPI for cffi in ABI mode: struct layouts, constants and ioctl numbers.

Struct layouts and constants come from one header, ``include/kvmits.h``, written for cffi's
cdef; ioctl numbers are computed here from the _IOC encoding and the struct sizes. Every
constant of the header is also a module attribute (``uapi.KVM_EXIT_MMIO``), so code reads
like the kernel's. tests/test_uapi_layout.py checks all of it against the real kernel headers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cffi

from kvmits.uapi.ioctls import IOCTLS, ioctl_numbers

__all__ = ["ffi", "libc", "HEADER", "header_sections", "IOCTLS", "arm64_core_reg"]


def _find_header() -> Path:
    """The cdef header: next to the package in a source tree, else where the wheel put it."""
    candidates = [
        Path(__file__).resolve().parents[2] / "include" / "kvmits.h",
        Path(sys.prefix) / "share" / "kvmits" / "include" / "kvmits.h",
    ]
    env = os.environ.get("KVMITS_HEADER")
    if env:
        candidates.insert(0, Path(env))
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError("kvmits.h not found; looked in: " + ", ".join(map(str, candidates)))


HEADER = _find_header()
_SOURCE = HEADER.read_text()


def header_sections(text: str = _SOURCE) -> dict[str, str]:
    """Split the header into its "@section NAME" parts (generic, arm64, x86)."""
    sections: dict[str, str] = {}
    current = None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("/* @section ") and stripped.endswith("*/"):
            current = stripped[len("/* @section "):-2].strip()
            sections[current] = ""
        elif current is not None:
            sections[current] += line
    return sections


ffi = cffi.FFI()
ffi.cdef(_SOURCE)
# The C library of this process: ioctl() and, through cffi, errno.
libc = ffi.dlopen(None)

# Every #define of the header becomes a module attribute, so `uapi.KVM_EXIT_MMIO` reads
# like the kernel's name. The names are listed in include/kvmits.h, nowhere else.
_CONSTANTS = {name: getattr(libc, name) for name in dir(libc) if name.isupper()}
globals().update(_CONSTANTS)
__all__ += sorted(_CONSTANTS)

globals().update(ioctl_numbers(ffi))
__all__ += sorted(IOCTLS)

_ARM64_CORE_FIELDS = {f"x{n}": 2 * n for n in range(31)}
# struct kvm_regs (arm64): struct user_pt_regs regs { u64 regs[31]; u64 sp; u64 pc; u64 pstate; };
# then u64 sp_el1; u64 elr_el1; u64 spsr[5]. The id is the field's offset in 32-bit words.
_ARM64_CORE_FIELDS.update(sp=62, pc=64, pstate=66, sp_el1=68, elr_el1=70)


def arm64_core_reg(name: str) -> int:
    """KVM_GET/SET_ONE_REG id of an arm64 core register: "x0".."x30", "sp", "pc", "pstate",
    "sp_el1", "elr_el1" (Documentation/virt/kvm/api.rst, 4.68 KVM_SET_ONE_REG, arm64 core registers)."""
    return (_CONSTANTS["KVM_REG_ARM64"] | _CONSTANTS["KVM_REG_SIZE_U64"] | _CONSTANTS["KVM_REG_ARM_CORE"]
            | _ARM64_CORE_FIELDS[name])


def arm64_core_reg_names() -> tuple[str, ...]:
    return tuple(_ARM64_CORE_FIELDS)
