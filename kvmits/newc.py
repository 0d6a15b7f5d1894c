"""Writer for the "newc" cpio format, the one the Linux initramfs unpacker reads.

Format: Documentation/driver-api/early-userspace/buffer-format.rst in the kernel tree.
Each entry is a 110-byte ASCII header ("070701" and 13 eight-digit hex fields), the
NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes. The archive ends
with an entry named "TRAILER!!!". The kernel accepts several archives concatenated, later
entries replacing earlier ones: that is how the testbed makes one initrd of its cached base
image and a per-run job archive, and how kvmits.lab.linux_guest adds a job to a nested
guest's initramfs.

Writing it here instead of calling cpio(1) lets us set owner root and create /dev/console
without being root on the host, and stream a job straight from the source tree. Standard
library only, and no other kvmits module: tools/testbed (the host's python3) imports it too.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# cpio(1) pads its output to 512-byte blocks; we do the same so archives concatenate cleanly.
BLOCK = 512


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def parent_dirs(paths) -> list[str]:
    """Every directory above the given archive paths (relative, '/'-separated), each once,
    parents first: the entries to write before the files, since the kernel's unpacker does
    not create missing directories."""
    dirs = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs, key=lambda d: (d.count("/"), d))


class NewcWriter:
    """Streams entries to a binary file. Paths are archive paths without a leading '/'."""

    def __init__(self, out: BinaryIO, mtime: int | None = None):
        self._out = out
        self._ino = 1
        self._written = 0
        self._mtime = mtime  # None: take each file's own mtime

    def _entry(self, name: str, mode: int, data: bytes = b"", *, mtime: int = 0,
               rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        chunk = header + encoded + b"\0" * _pad4(len(header) + len(encoded))
        chunk += data + b"\0" * _pad4(len(data))
        self._out.write(chunk)
        self._written += len(chunk)

    def _time(self, st_mtime: float) -> int:
        return int(st_mtime) if self._mtime is None else self._mtime

    def add_dir(self, name: str, mode: int = 0o755, mtime: int = 0) -> None:
        self._entry(name, stat.S_IFDIR | mode, mtime=mtime, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self._entry(name, stat.S_IFREG | mode, data, mtime=mtime)

    def add_symlink(self, name: str, target: str, mtime: int = 0) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode(), mtime=mtime)

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def add_path(self, name: str, path: str | os.PathLike) -> None:
        """Adds a file, directory or symlink from the host, owner root, permissions kept.
        Hard links are stored as independent copies (simpler, and rare in what we pack)."""
        st = os.lstat(path)
        perm = stat.S_IMODE(st.st_mode)
        mtime = self._time(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            self.add_dir(name, perm, mtime)
        elif stat.S_ISLNK(st.st_mode):
            self.add_symlink(name, os.readlink(path), mtime)
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                self.add_file(name, f.read(), perm, mtime)
        else:
            raise ValueError(f"{path}: cannot pack a {stat.filemode(st.st_mode)[0]!r} file")

    def add_tree(self, root: str | os.PathLike, prefix: str = "") -> int:
        """Adds everything under root (not root itself), parents before children,
        in sorted order so the same tree gives the same archive. Returns the entry count."""
        count = 0
        root = os.fspath(root)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            base = "" if rel == "." else rel + "/"
            # os.walk lists symlinks to directories among dirnames; pack them as links
            # and do not descend.
            for d in list(dirnames):
                if os.path.islink(os.path.join(dirpath, d)):
                    dirnames.remove(d)
                    filenames.append(d)
            for name in sorted(dirnames):
                self.add_path(prefix + base + name, os.path.join(dirpath, name))
                count += 1
            for name in sorted(filenames):
                self.add_path(prefix + base + name, os.path.join(dirpath, name))
                count += 1
        return count

    def close(self) -> None:
        """Writes the trailer and pads to a whole block; does not close the file."""
        self._entry(TRAILER, 0, nlink=1)
        self._out.write(b"\0" * ((BLOCK - self._written % BLOCK) % BLOCK))
