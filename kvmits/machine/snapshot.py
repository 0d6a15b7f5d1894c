"""The snapshot file of a saved VM (issue 13): versioned, self-describing, checksummed, RAM sparse.

    info = write_snapshot(path, meta, sections, ram)   # ram: [(gpa, memoryview), ...]
    with read_snapshot(path) as snap:                   # header, table, JSON, RAM index: verified
        snap.meta, snap.sections, snap.ram_regions
        snap.load_ram(lambda gpa, data: ...)            # RAM chunk by chunk, each verified first

Format, version 1 (all integers little-endian):

    offset 0      header, 36 bytes: struct "<16sIQII"
                    magic         b"kvmits-snapshot" padded with NUL to 16 bytes
                    version       1
                    table offset  where the section table starts
                    table length  its length in bytes; table offset + table length = file size
                    table crc32   CRC-32 of the table's bytes
    offset 36     the sections, back to back in table order, with no gaps
    table offset  the section table: a UTF-8 JSON array with one object per section,
                    {"name": str, "kind": "json" | "ram", "offset": int, "length": int,
                     "crc32": int}; the ram section also has "index_length": int

The sections must tile [36, table offset) exactly. JSON sections ("kind": "json") hold one JSON
value in UTF-8 (written with sorted keys and compact separators); "crc32" is the CRC-32 of their
bytes. The one named "meta" is the caller's meta (a JSON object); the others are the caller's
sections, by name, in the caller's order (they read back as json.loads returns them: tuples as
lists, keys as strings). There is exactly one "ram" section, named "ram": the compressed chunks
back to back, then its index, whose length is "index_length" and whose CRC-32 is "crc32":

    struct "<III"    region count R, chunk count C, run count N
    R x "<QQ"        a RAM region: guest-physical address, size in bytes (both multiples of 4096;
                     regions do not overlap)
    C x "<IIII"      a chunk: region number (0 is the first region above), how many runs it
                     holds, compressed length, CRC-32 of the compressed bytes; chunk i's data
                     follows chunk i-1's (chunk 0 at the section's start), and the lengths add
                     up to the section's length minus the index's
    N x "<QI"        a run: first page (4096 bytes) within its region, page count (>= 1); each
                     chunk takes the next "run count" runs, in order

A chunk is one zlib stream (level 1) of its runs' pages concatenated, at most 256 pages (1 MiB)
in all: the most a reader must hold at once, which bounds what a hostile file makes it allocate.
Runs are in address order, region by region (region numbers never decrease, and within a region
each run starts at or after the previous one's end), so checking each against the one before is
enough to rule out overlaps. A page that is not in any run is all zero: zero pages are not stored.

CRC-32 (zlib.crc32), not a cryptographic hash: it is there to catch a torn or damaged file, not
an adversary (nothing in a snapshot is authenticated), and it runs at memory speed in C, which
matters inside the emulated testbed. A hostile file is contained by the structure checks instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import time
import zlib
from typing import Callable, NamedTuple

from kvmits.errors import KvmitsError

FORMAT = "kvmits-snapshot"
VERSION = 1
#: the format's page, the unit zero pages are skipped in: fixed, not the host's (4 or 64 KiB)
PAGE = 4096
#: pages in a chunk at most: what a reader decompresses at once (1 MiB)
CHUNK_PAGES = 256
#: zero pages come in long runs in a guest's RAM: test 64 KiB blocks at once, then their pages
BLOCK_PAGES = 16
#: ... and 2 MiB spans before those: most of a guest's RAM is untouched
SPAN_PAGES = 512
#: speed over ratio: the writer runs in a Python 25 times slower than native (the testbed)
ZLIB_LEVEL = 1
#: section names the file's layout takes for itself
META, RAM = "meta", "ram"

_MAGIC = FORMAT.encode().ljust(16, b"\0")
_HEADER = struct.Struct("<16sIQII")
_INDEX_HEAD = struct.Struct("<III")
_REGION = struct.Struct("<QQ")
_CHUNK = struct.Struct("<IIII")
_RUN = struct.Struct("<QI")
_ZERO_SPAN = bytes(SPAN_PAGES * PAGE)


class SnapshotError(KvmitsError):
    """A snapshot file that cannot be written or read: the message names the file and the fault."""


class SnapshotInfo(NamedTuple):
    """What write_snapshot wrote: the file's size, RAM's size, its pages stored and skipped."""
    path: str
    file_bytes: int
    ram_bytes: int
    ram_pages_stored: int
    ram_pages_zero: int
    seconds: float


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def nonzero_runs(mv: memoryview):
    """(first page, page count) of each run of pages (PAGE bytes) that are not all zero: what a
    snapshot stores. Zero RAM is tested 2 MiB at a time, then 64 KiB, then by page: the loop runs
    in Python (25 times slower in the testbed), the compares in C."""
    pages = len(mv) // PAGE
    first = None
    for big in range(0, pages, SPAN_PAGES):
        # bytes.startswith compares a buffer in place (memcmp); a memoryview == bytes goes by item
        if _ZERO_SPAN.startswith(mv[big * PAGE:(big + SPAN_PAGES) * PAGE]):
            if first is not None:
                yield first, big - first
                first = None
            continue
        for block in range(big, min(big + SPAN_PAGES, pages), BLOCK_PAGES):
            if _ZERO_SPAN.startswith(mv[block * PAGE:(block + BLOCK_PAGES) * PAGE]):
                if first is not None:
                    yield first, block - first
                    first = None
                continue
            for page in range(block, min(block + BLOCK_PAGES, pages)):
                if _ZERO_SPAN.startswith(mv[page * PAGE:(page + 1) * PAGE]):
                    if first is not None:
                        yield first, page - first
                        first = None
                elif first is None:
                    first = page
    if first is not None:
        yield first, pages - first


def _write_ram(f, regions: list[tuple[int, memoryview]]) -> tuple[dict, int]:
    """Write the ram section at f's position: its table entry and the pages stored."""
    start = f.tell()
    chunks, runs, stored = [], [], 0

    def flush(r, mv, pending):
        z = zlib.compressobj(ZLIB_LEVEL)
        data = b"".join([z.compress(mv[a * PAGE:(a + n) * PAGE]) for a, n in pending]) + z.flush()
        f.write(data)
        chunks.append(_CHUNK.pack(r, len(pending), len(data), zlib.crc32(data)))
        runs.extend(_RUN.pack(a, n) for a, n in pending)

    for r, (_, mv) in enumerate(regions):
        pending, pages = [], 0
        for first, count in nonzero_runs(mv):
            while count:            # a run longer than a chunk's room continues in the next chunk
                take = min(count, CHUNK_PAGES - pages)
                pending.append((first, take))
                pages, stored = pages + take, stored + take
                first, count = first + take, count - take
                if pages == CHUNK_PAGES:
                    flush(r, mv, pending)
                    pending, pages = [], 0
        if pending:
            flush(r, mv, pending)
    index = b"".join([_INDEX_HEAD.pack(len(regions), len(chunks), len(runs)),
                      *(_REGION.pack(gpa, len(mv)) for gpa, mv in regions), *chunks, *runs])
    f.write(index)
    return {"name": RAM, "kind": "ram", "offset": start, "length": f.tell() - start,
            "crc32": zlib.crc32(index), "index_length": len(index)}, stored


def write_snapshot(path, meta: dict, sections: dict[str, object],
                   ram: list[tuple[int, memoryview]]) -> SnapshotInfo:
    """Write a snapshot to path, atomically: a temporary file beside it, fsync'd, then renamed.

    A failure (a section that is not JSON-able: SnapshotError; an OSError) leaves path as it was
    and removes the temporary file. The file is created mode 0600 (mkstemp): it holds guest RAM.
    """
    t0 = time.monotonic()
    path = os.fspath(path)
    regions = [(gpa, memoryview(buf).cast("B")) for gpa, buf in ram]
    last_end = 0
    for gpa, mv in sorted(regions, key=lambda region: region[0]):
        if gpa % PAGE or len(mv) % PAGE or gpa < 0:
            raise ValueError(f"RAM region at {gpa:#x} ({len(mv):#x} bytes) is not "
                             f"{PAGE}-byte aligned")
        if gpa < last_end:
            raise ValueError(f"RAM region at {gpa:#x} overlaps the one before it")
        last_end = gpa + len(mv)
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, not {type(meta).__name__}")
    if META in sections or RAM in sections:
        raise ValueError(f"section names {META!r} and {RAM!r} are the file's own")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.")
    try:
        with open(fd, "wb") as f:
            f.write(bytes(_HEADER.size))        # the header comes last: it points at the table
            table = []
            for name, obj in ((META, meta), *sections.items()):
                try:
                    data = _dumps(obj)
                except (TypeError, ValueError) as e:
                    raise SnapshotError(f"{path}: section {name!r} is not JSON-able: {e}") from e
                table.append({"name": name, "kind": "json", "offset": f.tell(),
                              "length": len(data), "crc32": zlib.crc32(data)})
                f.write(data)
            entry, stored = _write_ram(f, regions)
            table.append(entry)
            blob = _dumps(table)
            table_offset = f.tell()
            f.write(blob)
            f.seek(0)
            f.write(_HEADER.pack(_MAGIC, VERSION, table_offset, len(blob), zlib.crc32(blob)))
            f.flush()
            os.fsync(f.fileno())        # renamed over path only once it is on disk
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    ram_bytes = sum(len(mv) for _, mv in regions)
    return SnapshotInfo(path, table_offset + len(blob), ram_bytes, stored,
                        ram_bytes // PAGE - stored, time.monotonic() - t0)


class _Chunk(NamedTuple):
    offset: int                         # in the file
    length: int
    crc32: int
    pages: int
    runs: list[tuple[int, int]]         # (gpa, page count)


class Snapshot:
    """A snapshot file, open, its header, table, JSON sections and RAM index verified."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "rb")
        try:
            self._read_structure()
        except BaseException:
            self._f.close()
            raise

    def _error(self, what: str) -> SnapshotError:
        return SnapshotError(f"{self.path}: {what}")

    def _read(self, offset: int, length: int, what: str) -> bytes:
        self._f.seek(offset)
        data = self._f.read(length)
        if len(data) != length:
            raise self._error(f"truncated in {what}: {len(data)} of {length} bytes at "
                              f"offset {offset}")
        return data

    def _json(self, data: bytes, what: str):
        try:
            return json.loads(data.decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._error(f"{what} is not valid JSON: {e}") from e

    def _read_structure(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(_HEADER.size)
        if not head.startswith(_MAGIC) and not _MAGIC.startswith(head):
            raise self._error(f"not a kvmits snapshot (no {FORMAT!r} magic)")
        if len(head) < _HEADER.size:
            raise self._error(f"truncated in the header: {len(head)} of {_HEADER.size} bytes")
        _, version, table_offset, table_length, table_crc = _HEADER.unpack(head)
        if version != VERSION:
            raise self._error(f"format version {version}, this kvmits reads {VERSION}")
        table_end = table_offset + table_length
        if table_end > size:
            raise self._error(f"truncated: the section table is at [{table_offset}, {table_end}), "
                              f"the file has {size} bytes")
        if table_end < size:
            raise self._error(f"{size - table_end} bytes after the section table")
        blob = self._read(table_offset, table_length, "the section table")
        if zlib.crc32(blob) != table_crc:
            raise self._error("checksum mismatch in the section table")
        table = self._json(blob, "the section table")
        if not isinstance(table, list):
            raise self._error("the section table is not a JSON array")
        end, ram, meta, self.sections, seen = _HEADER.size, None, None, {}, set()
        for e in table:
            kind = e.get("kind") if isinstance(e, dict) else None
            keys = ("offset", "length", "crc32") + (("index_length",) if kind == "ram" else ())
            if kind not in ("json", "ram") or not isinstance(e.get("name"), str) or not all(
                    type(e.get(k)) is int and e[k] >= 0 for k in keys):
                raise self._error(f"bad section table entry {e!r}")
            name = e["name"]
            what = f"section {name!r}"
            if name in seen:
                raise self._error(f"{what} appears twice")
            seen.add(name)
            if e["offset"] != end:
                raise self._error(f"{what} is at [{e['offset']}, {e['offset'] + e['length']}), "
                                  f"not at {end} where the one before it ends")
            end += e["length"]
            if end > table_offset:
                raise self._error(f"{what} runs past the sections' end into the table "
                                  f"(at {table_offset})")
            if (kind == "ram") != (name == RAM):
                raise self._error(f"{what} is of kind {kind!r}: only {RAM!r} holds RAM, all of it")
            if kind == "ram":
                ram = e
                continue
            data = self._read(e["offset"], e["length"], what)
            if zlib.crc32(data) != e["crc32"]:
                raise self._error(f"checksum mismatch in {what}")
            if name == META:
                meta = self._json(data, what)
            else:
                self.sections[name] = self._json(data, what)
        if end != table_offset:
            raise self._error(f"{table_offset - end} bytes between the last section and the table")
        if not isinstance(meta, dict):
            raise self._error(f"no {META!r} section holding a JSON object")
        if ram is None:
            raise self._error(f"no {RAM!r} section")
        self.meta = meta
        self._read_ram_index(ram)

    def _read_ram_index(self, e: dict) -> None:
        ilen, data_end = e["index_length"], e["offset"] + e["length"] - e["index_length"]
        if not _INDEX_HEAD.size <= ilen <= e["length"]:
            raise self._error(f"the RAM index ({ilen} bytes) does not fit in the ram section "
                              f"({e['length']} bytes)")
        index = self._read(data_end, ilen, "the RAM index")
        if zlib.crc32(index) != e["crc32"]:
            raise self._error("checksum mismatch in the RAM index (section 'ram')")
        nregions, nchunks, nruns = _INDEX_HEAD.unpack_from(index)
        at = [_INDEX_HEAD.size]
        at.append(at[-1] + nregions * _REGION.size)
        at.append(at[-1] + nchunks * _CHUNK.size)
        at.append(at[-1] + nruns * _RUN.size)
        if at[-1] != ilen:
            raise self._error(f"the RAM index's counts ({nregions} regions, {nchunks} chunks, "
                              f"{nruns} runs) need {at[-1]} bytes, it has {ilen}")
        self.ram_regions = list(_REGION.iter_unpack(index[at[0]:at[1]]))
        last_end = 0
        for gpa, size in sorted(self.ram_regions):
            if gpa % PAGE or size % PAGE:
                raise self._error(f"RAM region at {gpa:#x} ({size:#x} bytes) is not "
                                  f"{PAGE}-byte aligned")
            if gpa < last_end:
                raise self._error(f"RAM region at {gpa:#x} overlaps the one before it")
            last_end = gpa + size
        runs = list(_RUN.iter_unpack(index[at[2]:at[3]]))
        self._chunks, offset, r, prev = [], e["offset"], 0, (0, 0)
        for region, count, length, crc in _CHUNK.iter_unpack(index[at[1]:at[2]]):
            if region >= nregions or count == 0 or r + count > nruns:
                raise self._error(f"RAM chunk {len(self._chunks)} names region {region} of "
                                  f"{nregions} and runs [{r}, {r + count}) of {nruns}")
            gpa, size = self.ram_regions[region]
            where = f"RAM chunk at gpa {gpa + runs[r][0] * PAGE:#x}"
            chunk_runs = []
            for first, n in runs[r:r + count]:
                if n == 0 or (first + n) * PAGE > size:
                    raise self._error(f"{where}: pages [{first}, {first + n}) lie outside its "
                                      f"region [{gpa:#x}, {gpa + size:#x})")
                if (region, first) < prev:
                    raise self._error(f"{where}: its run at page {first} of region {region} "
                                      "overlaps or precedes the one before it")
                prev = (region, first + n)
                chunk_runs.append((gpa + first * PAGE, n))
            pages = sum(n for _, n in chunk_runs)
            if pages > CHUNK_PAGES:
                raise self._error(f"{where} holds {pages} pages, more than {CHUNK_PAGES}")
            self._chunks.append(_Chunk(offset, length, crc, pages, chunk_runs))
            offset, r = offset + length, r + count
        if r != nruns:
            raise self._error(f"{nruns - r} RAM runs belong to no chunk")
        if offset != data_end:
            raise self._error(f"the RAM chunks take {offset - e['offset']} bytes, "
                              f"the ram section has {data_end - e['offset']} before its index")

    def load_ram(self, write: Callable[[int, memoryview | bytes], None]) -> int:
        """Call write(gpa, data) for every stored run of pages; return the bytes written.

        Zero pages are not written: the destination must already be zero, as the fresh anonymous
        memory of a new VM is. Each chunk is read, its checksum and decompressed size verified,
        before any of its runs is written; at most one chunk (1 MiB) is held at a time.
        """
        written = 0
        for c in self._chunks:
            where = f"RAM chunk at gpa {c.runs[0][0]:#x}"
            data = self._read(c.offset, c.length, where)
            if zlib.crc32(data) != c.crc32:
                raise self._error(f"checksum mismatch in {where} (section 'ram')")
            expected = c.pages * PAGE
            z = zlib.decompressobj()
            try:
                # one byte of room past the declared size: a longer stream shows, a bomb cannot grow
                out = z.decompress(data, expected + 1)
            except zlib.error as e:
                raise self._error(f"{where} does not decompress: {e}") from e
            if len(out) != expected or not z.eof or z.unused_data:
                raise self._error(f"{where} is not one zlib stream of its {c.pages} pages "
                                  f"({len(out)}{'+' if len(out) > expected else ''} bytes, "
                                  f"{'complete' if z.eof else 'incomplete'})")
            view, at = memoryview(out), 0
            for gpa, pages in c.runs:
                write(gpa, view[at:at + pages * PAGE])
                at += pages * PAGE
            written += expected
        return written

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_snapshot(path) -> Snapshot:
    """Open a snapshot and verify all of it but the RAM chunks (Snapshot.load_ram reads those)."""
    return Snapshot(os.fspath(path))
