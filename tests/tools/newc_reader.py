"""A reader for newc cpio archives, independent of the writer under test, following the
format as the kernel documents it (Documentation/driver-api/early-userspace/buffer-format.rst)."""

from dataclasses import dataclass


@dataclass
class Entry:
    name: str
    mode: int
    data: bytes
    rdev: tuple[int, int]
    mtime: int
    uid: int
    gid: int
    offset: int  # where the header starts


def read_archives(blob: bytes) -> list[list[Entry]]:
    """All archives in blob (concatenated, zero padding between them), each a list of entries
    without the trailer."""
    archives: list[list[Entry]] = []
    pos = 0
    current: list[Entry] = []
    while pos < len(blob):
        if blob[pos] == 0:  # padding between archives
            pos += 1
            continue
        assert pos % 4 == 0, f"header at {pos} not 4-byte aligned"
        assert blob[pos:pos + 6] == b"070701", f"bad magic at {pos}: {blob[pos:pos + 6]!r}"
        fields = [int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        (_ino, mode, uid, gid, _nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, _chk) = fields
        name_start = pos + 110
        name = blob[name_start:name_start + namesize - 1].decode()
        assert blob[name_start + namesize - 1] == 0
        data_start = (name_start + namesize + 3) & ~3
        data = blob[data_start:data_start + size]
        entry_pos = pos
        pos = (data_start + size + 3) & ~3
        if name == "TRAILER!!!":
            archives.append(current)
            current = []
            continue
        current.append(Entry(name, mode, data, (rmaj, rmin), mtime, uid, gid, entry_pos))
    assert not current, "archive without a trailer"
    return archives
