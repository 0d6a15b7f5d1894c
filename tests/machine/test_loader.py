"""Image placement: raw images, arm64 Linux Image headers (synthetic), gzip, the DTB/initrd layout."""

import gzip
import struct

import pytest

from kvmits.machine.loader import (
    DTB_ALIGN,
    ImageError,
    detect_kind,
    parse_linux_header,
    place_image,
    plan_layout,
)
from kvmits.machine.memmap import Region

RAM = Region("ram", 0x40000000, 64 << 20)


def linux_image(text_offset=0x0, image_size=0x300000, flags=0b1010, body=0x1000):
    """A synthetic arm64 Image: the 64-byte header of booting.rst, then filler."""
    header = struct.pack("<II QQQ QQQ I I", 0x14000010, 0, text_offset, image_size, flags, 0, 0, 0, 0x644D5241, 0)
    return header + bytes(body - len(header))


def test_raw_image_at_ram_plus_512k():
    img = place_image(RAM, b"\x01\x02\x03\x04" * 10, "raw")
    assert (img.kind, img.load_addr, img.entry, img.footprint) == ("raw", 0x40080000, 0x40080000, 40)
    assert img.load_addr % 0x10000 == 0


def test_linux_header_is_honoured():
    data = linux_image(text_offset=0x80000, image_size=0x1234000)
    assert parse_linux_header(data) == (0x80000, 0x1234000, 0b1010)
    img = place_image(RAM, data)
    assert img.kind == "linux"
    assert img.load_addr == img.entry == 0x40000000 + 0x80000       # 2 MiB-aligned base + text_offset
    assert img.footprint == 0x1234000
    lay = plan_layout(RAM, img)
    assert lay.dtb_addr == 0x40000000 + 0x1400000                   # next 2 MiB boundary after the footprint
    assert lay.dtb_addr >= img.load_addr + img.footprint and lay.dtb_addr % DTB_ALIGN == 0


def test_legacy_image_without_size_uses_0x80000():
    data = linux_image(text_offset=0x12345, image_size=0)
    assert parse_linux_header(data).text_offset == 0x80000
    assert place_image(RAM, data).footprint == len(data)


def test_gzip_image_is_decompressed():
    data = linux_image()
    packed = gzip.compress(data)
    assert detect_kind(packed) == "linux"
    img = place_image(RAM, packed, "auto")
    assert img.kind == "linux" and img.data == data
    assert place_image(RAM, packed, "linux").data == data


def test_detect_kind():
    assert detect_kind(linux_image()) == "linux"
    assert detect_kind(b"\xd5\x03\x20\x1f" * 16) == "raw"
    assert detect_kind(gzip.compress(b"not a kernel" * 10)) == "raw"


def test_bad_images_are_refused():
    with pytest.raises(ImageError, match="magic"):
        place_image(RAM, b"\0" * 128, "linux")
    with pytest.raises(ImageError, match="image_size"):
        place_image(RAM, linux_image(image_size=0x10, body=0x1000), "linux")
    with pytest.raises(ImageError, match="does not fit"):
        place_image(RAM, linux_image(text_offset=0x80000, image_size=RAM.size), "linux")
    with pytest.raises(ImageError, match="empty"):
        place_image(RAM, b"", "raw")
    with pytest.raises(ImageError, match="gzip"):
        place_image(RAM, b"\x1f\x8b" + b"\0" * 20, "linux")
    with pytest.raises(ValueError):
        place_image(RAM, b"x", "elf")


def test_dtb_and_initrd_above_the_image():
    img = place_image(RAM, b"\0" * 0x1000, "raw")
    lay = plan_layout(RAM, img, initrd_size=0x123456)
    assert lay.dtb_addr == 0x40200000                  # first 2 MiB boundary above 0x40081000
    assert lay.initrd_addr == lay.dtb_addr + (2 << 20)   # after the 2 MiB a device tree may take
    assert lay.initrd_addr % 0x1000 == 0
    assert plan_layout(RAM, img).initrd_addr is None


def test_no_room_for_the_initrd():
    img = place_image(RAM, b"\0" * 0x1000, "raw")
    with pytest.raises(ImageError, match="initrd"):
        plan_layout(RAM, img, initrd_size=RAM.size)
    small = Region("ram", 0x40000000, 2 << 20)
    with pytest.raises(ImageError, match="device tree"):
        plan_layout(small, place_image(small, b"\0" * 16, "raw"))
