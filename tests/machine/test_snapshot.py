"""kvmits.machine.snapshot: round trips, sparse RAM, and every kind of bad file refused.

Bad files are made two ways: by damaging a written file (truncating it, flipping bytes), and by
`build`, a writer of this test's own made from the format in the module's docstring, for files
whose checksums are right but whose structure is not.
"""

import json
import mmap
import os
import random
import struct
import tracemalloc
import zlib

import pytest

from kvmits.errors import KvmitsError
from kvmits.machine import snapshot
from kvmits.machine.snapshot import FORMAT, PAGE, VERSION, SnapshotError, read_snapshot, write_snapshot

META = {"cpus": 2, "ram": "64M", "its": "kernel"}
SECTIONS = {"vcpus": [{"pc": 0x4008_0000, "regs": list(range(31))}] * 2, "gic": {"gicd_ctlr": 0x12},
            "devices": {"pl011": {"fifo": "héllo"}}}


def pages(rng, n):
    """n pages of random-ish (compressible) bytes, none of them all zero."""
    return b"".join(bytes([1 + i % 255]) + rng.randbytes(PAGE // 2 - 1) + bytes(PAGE // 2)
                    for i in range(n))


def regions_with_holes():
    """Regions as the machine has them: zero pages, runs at both edges, an all-zero region, and a
    run (300 pages) longer than a chunk (256)."""
    rng = random.Random(13)
    a = bytearray(64 * PAGE)
    a[0:PAGE] = pages(rng, 1)                       # the first page
    a[10 * PAGE:13 * PAGE] = pages(rng, 3)
    a[63 * PAGE:] = pages(rng, 1)                   # the last page
    b = bytearray(32 * PAGE)                        # all zero
    c = bytearray(700 * PAGE)
    c[5 * PAGE:305 * PAGE] = pages(rng, 300)
    for p in rng.sample(range(320, 700), 90):       # scattered single pages, some adjacent
        c[p * PAGE:(p + 1) * PAGE] = pages(rng, 1)
    c[310 * PAGE] = 1                               # pages zero but for their first byte ...
    c[312 * PAGE + PAGE - 1] = 7                    # ... or their last: stored all the same
    return [(0x4000_0000, a), (0x8000_0000, b), (0x1_0000_0000, c)]


def load_into(snap, regions, fill=0):
    """load_ram into fresh copies of the regions (filled with `fill`); also the calls made."""
    dest = {gpa: bytearray([fill]) * len(buf) for gpa, buf in regions}
    calls = []

    def write(gpa, data):
        base = max(g for g in dest if g <= gpa)
        dest[base][gpa - base:gpa - base + len(data)] = data
        calls.append((gpa, bytes(data)))

    return dest, calls, snap.load_ram(write)


def nonzero_pages(regions):
    return {gpa + i for gpa, buf in regions for i in range(0, len(buf), PAGE) if any(buf[i:i + PAGE])}


def test_round_trip(tmp_path):
    regions = regions_with_holes()
    info = write_snapshot(tmp_path / "vm.snap", META, SECTIONS, [(g, memoryview(b)) for g, b in regions])
    assert info.file_bytes == os.path.getsize(tmp_path / "vm.snap")
    assert info.ram_bytes == sum(len(b) for _, b in regions)
    stored = len(nonzero_pages(regions))
    assert (info.ram_pages_stored, info.ram_pages_zero) == (stored, info.ram_bytes // PAGE - stored)
    with read_snapshot(tmp_path / "vm.snap") as snap:
        assert snap.meta == META
        assert snap.sections == json.loads(json.dumps(SECTIONS))
        assert list(snap.sections) == list(SECTIONS)
        assert snap.ram_regions == [(g, len(b)) for g, b in regions]
        dest, calls, written = load_into(snap, regions)
    assert dest == {g: b for g, b in regions}
    assert written == stored * PAGE == sum(len(d) for _, d in calls)
    # only the nonzero pages were written, each once; the all-zero region not at all
    written_pages = [gpa + i for gpa, d in calls for i in range(0, len(d), PAGE)]
    assert sorted(written_pages) == sorted(nonzero_pages(regions))
    assert not any(0x8000_0000 <= gpa < 0x8000_0000 + 32 * PAGE for gpa in written_pages)


def test_zero_pages_are_neither_stored_nor_written(tmp_path):
    ram = mmap.mmap(-1, 64 << 20)
    for p in (0, 1, 2, 5000, 16383):
        ram[p * PAGE:(p + 1) * PAGE] = pages(random.Random(p), 1)
    info = write_snapshot(tmp_path / "s", {}, {}, [(0x4000_0000, memoryview(ram))])
    assert (info.ram_pages_stored, info.ram_pages_zero, info.ram_bytes) == (5, 16384 - 5, 64 << 20)
    assert info.file_bytes < 5 * PAGE
    with read_snapshot(tmp_path / "s") as snap:
        dest, calls, written = load_into(snap, [(0x4000_0000, ram)], fill=0xAA)
    # a page not written keeps the destination's 0xAA: proof the zero pages were skipped
    assert [(gpa - 0x4000_0000) // PAGE for gpa, _ in calls] == [0, 5000, 16383]
    assert dest[0x4000_0000][3 * PAGE:4 * PAGE] == b"\xaa" * PAGE
    assert written == 5 * PAGE and dest[0x4000_0000][:3 * PAGE] == ram[:3 * PAGE]


def test_a_missing_file_names_its_path(tmp_path):
    with pytest.raises(OSError, match="nothere"):
        read_snapshot(tmp_path / "nothere")


# -- bad files made by damaging a good one

@pytest.fixture
def small(tmp_path):
    """A small snapshot's path and bytes: a chunk in each of two regions, four JSON sections."""
    rng = random.Random(1)
    a = bytearray(8 * PAGE)
    a[PAGE:3 * PAGE] = rng.randbytes(300).ljust(2 * PAGE, b"\5")      # small compressed: a short test
    b = bytearray(16 * PAGE)
    b[4 * PAGE:10 * PAGE] = bytes([9]) * (6 * PAGE)
    path = tmp_path / "small.snap"
    write_snapshot(path, META, SECTIONS, [(0x4000_0000, memoryview(a)), (0x5000_0000, memoryview(b))])
    return path, path.read_bytes()


def refused(path, data) -> str:
    """The SnapshotError message for a file of these bytes, from read_snapshot or load_ram."""
    path.write_bytes(data)
    with pytest.raises(SnapshotError) as e:
        with read_snapshot(path) as snap:
            snap.load_ram(lambda gpa, data: None)
    assert str(path) in str(e.value) and isinstance(e.value, KvmitsError)
    return str(e.value)


def test_every_truncation_is_refused(small, tmp_path):
    _, data = small
    for n in range(len(data)):
        msg = refused(tmp_path / "cut", data[:n])
        assert "truncated" in msg or (n >= 16 and "not a kvmits snapshot" in msg), (n, msg)


def test_every_flipped_byte_is_refused(small, tmp_path):
    _, data = small
    for i in range(len(data)):
        refused(tmp_path / "flip", data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:])


def table_of(data):
    _, _, offset, length, _ = struct.unpack_from("<16sIQII", data)
    return {e["name"]: e for e in json.loads(data[offset:offset + length])}


@pytest.mark.parametrize("name", ["meta", "vcpus", "gic", "devices"])
def test_a_flip_in_a_json_section_names_it(small, tmp_path, name):
    _, data = small
    at = table_of(data)[name]["offset"] + 1
    msg = refused(tmp_path / "flip", data[:at] + b"\0" + data[at + 1:])
    assert f"checksum mismatch in section '{name}'" in msg


def test_a_flip_in_a_ram_chunk_names_its_gpa_and_writes_nothing_of_it(small, tmp_path):
    path, data = small
    at = table_of(data)["ram"]["offset"] + 20             # inside the first chunk (region 0)
    path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    calls = []
    message = "checksum mismatch in RAM chunk at gpa 0x40001000"
    with read_snapshot(path) as snap, pytest.raises(SnapshotError, match=message):
        snap.load_ram(lambda gpa, d: calls.append(gpa))
    assert calls == []


def test_a_file_cut_after_it_was_opened_is_refused_by_load_ram(tmp_path):
    path = tmp_path / "vm.snap"
    write_snapshot(path, META, SECTIONS, [(g, memoryview(b)) for g, b in regions_with_holes()])
    with read_snapshot(path) as snap:
        os.truncate(path, table_of(path.read_bytes())["ram"]["offset"] + 10)
        with pytest.raises(SnapshotError, match="truncated in RAM chunk at gpa 0x40000000"):
            snap.load_ram(lambda gpa, d: None)


def test_another_version_and_another_format(small, tmp_path):
    _, data = small
    bumped = data[:16] + struct.pack("<I", VERSION + 1) + data[20:]
    assert "format version 2, this kvmits reads 1" in refused(tmp_path / "v", bumped)
    assert "not a kvmits snapshot" in refused(tmp_path / "zip", b"PK\x03\x04" + data[4:])
    assert "not a kvmits snapshot" in refused(tmp_path / "json", b'{"format": "kvmits-snapshot"}')


# -- bad files with right checksums, made from the format's description

def chunk(region, runs, raw=None):
    """A chunk of runs [(first page, count)]; its data are pages of the run's first page number."""
    if raw is None:
        raw = b"".join(bytes([1 + first % 250]) * (n * PAGE) for first, n in runs)
    return region, runs, zlib.compress(raw, 1)


def ram_section(regions, chunks):
    index = struct.pack("<III", len(regions), len(chunks), sum(len(r) for _, r, _ in chunks))
    index += b"".join(struct.pack("<QQ", gpa, size) for gpa, size in regions)
    index += b"".join(struct.pack("<IIII", r, len(runs), len(z), zlib.crc32(z))
                      for r, runs, z in chunks)
    index += b"".join(struct.pack("<QI", *run) for _, runs, _ in chunks for run in runs)
    data = b"".join(z for _, _, z in chunks) + index
    return data, {"crc32": zlib.crc32(index), "index_length": len(index)}


def build(sections, version=VERSION, magic=FORMAT.encode()):
    """A file of [(name, kind, bytes, entry fields to set)], laid out as the docstring says."""
    body, table, offset = b"", [], 36
    for name, kind, data, fields in sections:
        table.append({"name": name, "kind": kind, "offset": offset + len(body), "length": len(data),
                      "crc32": zlib.crc32(data), **fields})
        body += data
    blob = json.dumps(table).encode()
    head = struct.pack("<16sIQII", magic, version, offset + len(body), len(blob), zlib.crc32(blob))
    return head + body + blob


REGIONS = [(0x4000_0000, 16 * PAGE), (0x5000_0000, 512 * PAGE)]


def good_parts(chunks=(chunk(0, [(1, 2), (7, 1)]), chunk(1, [(0, 256)]), chunk(1, [(300, 4)])),
               regions=REGIONS):
    data, fields = ram_section(regions, list(chunks))
    return [("meta", "json", b'{"a":1}', {}), ("vcpus", "json", b"[1,2]", {}),
            ("ram", "ram", data, fields)]


def test_a_file_written_from_the_description_reads(tmp_path):
    (tmp_path / "ok").write_bytes(build(good_parts()))
    with read_snapshot(tmp_path / "ok") as snap:
        assert (snap.meta, snap.sections, snap.ram_regions) == ({"a": 1}, {"vcpus": [1, 2]}, REGIONS)
        dest, calls, written = load_into(snap, [(g, bytes(n)) for g, n in REGIONS])
    assert [gpa for gpa, _ in calls] == [0x4000_1000, 0x4000_7000, 0x5000_0000, 0x5012_C000]
    assert written == (3 + 256 + 4) * PAGE
    assert dest[0x4000_0000][PAGE:3 * PAGE] == bytes([2]) * (2 * PAGE)      # run (1, 2): byte 1 + 1


@pytest.mark.parametrize("chunks, regions, message", [
    ([chunk(0, [(15, 2)])], REGIONS, r"RAM chunk at gpa 0x4000f000: pages \[15, 17\) lie outside"),
    ([chunk(2, [(0, 1)])], REGIONS, "names region 2 of 2"),
    ([chunk(1, [(0, 10)]), chunk(1, [(9, 1)])], REGIONS, "RAM chunk at gpa 0x50009000: .* overlaps"),
    ([chunk(1, [(0, 1)]), chunk(0, [(0, 1)])], REGIONS, "RAM chunk at gpa 0x40000000: .* precedes"),
    ([chunk(0, [(3, 1), (2, 1)])], REGIONS, "run at page 2 of region 0 overlaps or precedes"),
    ([chunk(0, [(3, 0)])], REGIONS, "outside its region"),
    ([chunk(1, [(0, 257)])], REGIONS, "holds 257 pages, more than 256"),
    ([], [(0x4000_0800, PAGE)], "RAM region at 0x40000800 .* not 4096-byte aligned"),
    ([], [(0x4000_0000, 2 * PAGE), (0x4000_1000, PAGE)], "RAM region at 0x40001000 overlaps"),
])
def test_bad_ram_structure_is_refused_before_load(tmp_path, chunks, regions, message):
    (tmp_path / "bad").write_bytes(build(good_parts(chunks, regions)))
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(tmp_path / "bad")


@pytest.mark.parametrize("raw, message", [
    (bytes(64 << 20), r"chunk at gpa 0x40000000 is not one zlib stream of its 1 pages \(4097\+ bytes"),
    (bytes(PAGE - 1), r"\(4095 bytes, complete\)"),
])
def test_a_chunk_that_decompresses_to_another_size_is_refused(tmp_path, raw, message):
    (tmp_path / "bomb").write_bytes(build(good_parts([chunk(0, [(0, 1)], raw)])))
    calls = []
    with read_snapshot(tmp_path / "bomb") as snap:
        tracemalloc.start()
        try:
            with pytest.raises(SnapshotError, match=message):
                snap.load_ram(lambda gpa, d: calls.append(gpa))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert calls == [] and peak < 1 << 20         # the 64 MiB were never inflated


def test_a_chunk_that_is_not_zlib_is_refused(tmp_path):
    region, runs, z = chunk(0, [(0, 1)])
    for bad, message in ((z[:-3], "incomplete"), (z + b"junk", "complete"),
                         (b"\xff" + z[1:], "does not decompress")):
        (tmp_path / "bad").write_bytes(build(good_parts([(region, runs, bad)])))
        with read_snapshot(tmp_path / "bad") as snap, pytest.raises(SnapshotError, match=message):
            snap.load_ram(lambda gpa, d: None)


def test_bad_json_and_bad_tables_are_refused(tmp_path):
    meta, vcpus, ram = good_parts()
    cases = [
        ([meta, ("vcpus", "json", b"[1,", {}), ram], "section 'vcpus' is not valid JSON"),
        ([meta, ("vcpus", "json", b'"\xff"', {}), ram], "section 'vcpus' is not valid JSON"),
        ([meta, ("vcpus", "json", b"[" * 100000, {}), ram], "section 'vcpus' is not valid JSON"),
        ([("meta", "json", b"[]", {}), ram], "no 'meta' section holding a JSON object"),
        ([vcpus, ram], "no 'meta' section"),
        ([meta, vcpus], "no 'ram' section"),
        ([meta, vcpus, vcpus, ram], "section 'vcpus' appears twice"),
        ([meta, ("vcpus",) + ram[1:]], "section 'vcpus' is of kind 'ram'"),
        ([meta, ("vcpus", "yaml", b"[]", {}), ram], "bad section table entry"),
        ([meta, ("vcpus", "json", b"[]", {"length": -1}), ram], "bad section table entry"),
        ([meta, ("vcpus", "json", b"[]", {"crc32": "0"}), ram], "bad section table entry"),
        ([meta, ram[:3] + ({"crc32": ram[3]["crc32"]},)], "bad section table entry"),
        ([meta, ("vcpus", "json", b"[]", {"offset": 999999}), ram], "section 'vcpus' is at [999999, "),
        ([meta, ("vcpus", "json", b"[]", {"length": 999999})], "runs past the sections' end"),
        ([meta, ram[:3] + ({**ram[3], "index_length": 999999},)], "index (999999 bytes) does not fit"),
    ]
    for parts, message in cases:
        assert message in refused(tmp_path / "bad", build(parts)), message
    # the table itself
    good = build(good_parts())
    head, body = good[:36], good[36:]
    _, version, offset, length, crc = struct.unpack("<16sIQII", head)
    not_list = b'{"a":1}'
    head = struct.pack("<16sIQII", FORMAT.encode(), version, offset, len(not_list), zlib.crc32(not_list))
    msg = refused(tmp_path / "t", head + body[:offset - 36] + not_list)
    assert "the section table is not a JSON array" in msg
    assert "bytes after the section table" in refused(tmp_path / "t", good + b"\0")
    gap = struct.pack("<16sIQII", FORMAT.encode(), version, offset + 1, length, crc)
    assert "1 bytes between the last section and the table" in refused(
        tmp_path / "t", gap + body[:offset - 36] + b"\0" + body[offset - 36:])


def test_ram_index_counts_must_match_its_length(tmp_path):
    data, fields = ram_section(REGIONS, [chunk(0, [(0, 1)])])
    index = data[-fields["index_length"]:]
    lying = struct.pack("<III", 2, 1, 5) + index[12:]            # 5 runs declared, 1 present
    parts = good_parts()[:2] + [("ram", "ram", data[:-len(index)] + lying,
                                 {"crc32": zlib.crc32(lying), "index_length": len(lying)})]
    assert "need " in refused(tmp_path / "bad", build(parts))


# -- writing

def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "vm.snap").write_bytes(b"the previous snapshot")
    ram = [(0x4000_0000, memoryview(bytearray(b"\1" * PAGE)))]
    with pytest.raises(SnapshotError, match="vm.snap: section 'devices' is not JSON-able"):
        write_snapshot(tmp_path / "vm.snap", META, {"vcpus": [], "devices": {"uart": object()}}, ram)
    with pytest.raises(SnapshotError, match="section 'gic' is not JSON-able"):
        write_snapshot(tmp_path / "vm.snap", META, {"gic": float("nan")}, ram)

    def no_space(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(snapshot.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_snapshot(tmp_path / "vm.snap", META, SECTIONS, ram)
    assert os.listdir(tmp_path) == ["vm.snap"]
    assert (tmp_path / "vm.snap").read_bytes() == b"the previous snapshot"
    monkeypatch.undo()
    write_snapshot(tmp_path / "vm.snap", META, SECTIONS, ram)
    assert os.listdir(tmp_path) == ["vm.snap"] and read_snapshot(tmp_path / "vm.snap").meta == META


def test_the_writer_refuses_what_it_cannot_store(tmp_path):
    ram = memoryview(bytearray(2 * PAGE))
    for regions, message in (([(0x800, ram)], "not 4096-byte aligned"),
                             ([(0, ram[:100])], "not 4096-byte aligned"),
                             ([(0x2000, ram), (PAGE, ram)], "at 0x2000 overlaps")):
        with pytest.raises(ValueError, match=message):
            write_snapshot(tmp_path / "s", {}, {}, regions)
    with pytest.raises(ValueError, match="file's own"):
        write_snapshot(tmp_path / "s", {}, {"ram": []}, [])
    with pytest.raises(TypeError, match="meta must be a dict"):
        write_snapshot(tmp_path / "s", [], {}, [])
    assert os.listdir(tmp_path) == []
