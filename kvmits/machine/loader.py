"""Guest images and where the image, the device tree and the initrd go in RAM.

Boot contract (the one Linux's Documentation/arch/arm64/booting.rst sets, which bare guest
programs follow too): vCPU 0 starts at the image's first byte in EL1h with the MMU and caches
off and DAIF masked (KVM's reset state after KVM_ARM_VCPU_INIT), x0 = guest-physical address of
the device tree, x1 = x2 = x3 = 0. Secondary vCPUs start powered off and come up through PSCI
CPU_ON. Image kinds:

- raw: loaded at RAM + 0x80000 (64 KiB-aligned), entry at its first byte.
- linux: an arm64 Image: header magic "ARM\\x64" at 0x38, loaded at text_offset from the
  2 MiB-aligned start of RAM, occupying image_size bytes (BSS included). A gzip-compressed Image
  (Debian's vmlinuz) is decompressed first.

The device tree goes at the first 2 MiB boundary after the image's footprint (booting.rst: 8-byte
aligned, at most 2 MiB, not sharing a 2 MiB block with anything mapped differently), and the
initrd right after the 2 MiB reserved for the device tree (page-aligned).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import NamedTuple

from kvmits.machine.devicetree import MAX_DTB_SIZE
from kvmits.machine.memmap import Region

RAW_LOAD_OFFSET = 0x80000
LINUX_BASE_ALIGN = 2 << 20
DTB_ALIGN = 2 << 20
INITRD_ALIGN = 0x1000
# booting.rst: the 64-byte header; magic at 0x38
_LINUX_HEADER = struct.Struct("<II QQQ QQQ I I")
LINUX_MAGIC = 0x644D5241            # "ARM\x64", little-endian
LINUX_MAGIC_OFFSET = 0x38
#: text_offset of a pre-3.17 Image, whose image_size is 0 (booting.rst)
LEGACY_TEXT_OFFSET = 0x80000
GZIP_MAGIC = b"\x1f\x8b"
KINDS = ("auto", "raw", "linux")


class ImageError(ValueError):
    """The image cannot be booted on this machine (bad header, does not fit, ...)."""


class LinuxHeader(NamedTuple):
    text_offset: int
    image_size: int
    flags: int


class BootImage(NamedTuple):
    """A guest image placed in RAM: `data` goes at `load_addr`; it occupies `footprint` bytes
    from there (BSS included); execution starts at `entry`."""

    kind: str
    data: bytes
    load_addr: int
    entry: int
    footprint: int


class BootLayout(NamedTuple):
    image: BootImage
    dtb_addr: int
    initrd_addr: int | None
    #: the end of what was placed (image, device tree, initrd): RAM above it is the guest's
    end: int


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def is_linux_image(data: bytes) -> bool:
    return (len(data) >= _LINUX_HEADER.size
            and struct.unpack_from("<I", data, LINUX_MAGIC_OFFSET)[0] == LINUX_MAGIC)


def parse_linux_header(data: bytes) -> LinuxHeader:
    """text_offset, image_size and flags of an arm64 Image header (booting.rst, section 4)."""
    if not is_linux_image(data):
        raise ImageError('not an arm64 Linux Image: no "ARM\\x64" magic at offset 0x38')
    (_code0, _code1, text_offset, image_size, flags, _r2, _r3, _r4, _magic, _r5) = _LINUX_HEADER.unpack_from(data)
    if image_size == 0:
        # Before v3.17 image_size was 0 and text_offset was 0x80000 (booting.rst); the BSS size is
        # then unknown, so the file size is all we can reserve.
        return LinuxHeader(LEGACY_TEXT_OFFSET, len(data), flags)
    if image_size < len(data):
        raise ImageError(f"Image header says image_size={image_size:#x}, smaller than the file ({len(data):#x})")
    return LinuxHeader(text_offset, image_size, flags)


def _gunzip(data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageError(f"gzip-compressed image does not decompress: {exc}") from exc


def detect_kind(data: bytes) -> str:
    """"linux" for an arm64 Image (or a gzip-compressed one), else "raw"."""
    if is_linux_image(data):
        return "linux"
    if data[:2] == GZIP_MAGIC and is_linux_image(_gunzip(data)):
        return "linux"
    return "raw"


def place_image(ram: Region, data: bytes, kind: str = "auto") -> BootImage:
    """Decide where `data` goes in `ram` (nothing is written)."""
    if kind not in KINDS:
        raise ValueError(f"image kind must be one of {KINDS}, not {kind!r}")
    if not data:
        raise ImageError("empty image")
    if kind == "auto":
        kind = detect_kind(data)
    if kind == "linux":
        if data[:2] == GZIP_MAGIC:
            data = _gunzip(data)
        header = parse_linux_header(data)
        load = align_up(ram.base, LINUX_BASE_ALIGN) + header.text_offset
        image = BootImage("linux", data, load, load, header.image_size)
    else:
        load = ram.base + RAW_LOAD_OFFSET
        image = BootImage("raw", data, load, load, len(data))
    if image.load_addr + image.footprint > ram.end:
        raise ImageError(f"{kind} image of {image.footprint:#x} bytes at {image.load_addr:#x} does not fit "
                         f"in RAM [{ram.base:#x}, {ram.end:#x})")
    return image


def plan_layout(ram: Region, image: BootImage, initrd_size: int | None = None) -> BootLayout:
    """Where the device tree and the initrd go, above the image (see the module docstring)."""
    dtb_addr = align_up(image.load_addr + image.footprint, DTB_ALIGN)
    end = dtb_addr + MAX_DTB_SIZE
    initrd_addr = None
    if initrd_size is not None:
        initrd_addr = align_up(end, INITRD_ALIGN)
        end = initrd_addr + initrd_size
    if end > ram.end:
        what = "device tree and initrd" if initrd_size is not None else "device tree"
        raise ImageError(f"no room for the {what} above the image: need RAM up to {end:#x}, "
                         f"RAM ends at {ram.end:#x}")
    return BootLayout(image, dtb_addr, initrd_addr, end)
