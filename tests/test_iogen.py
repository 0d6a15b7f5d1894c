"""guests/linux/iogen.c, the Linux guest's block load generator, built natively and run on the host
against a regular file (O_DIRECT + native AIO work on a file as on a block device), and its
static aarch64 build through guests/Makefile."""

from __future__ import annotations

import errno
import json
import mmap
import os
import platform
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "guests" / "linux" / "iogen.c"
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"]  # as guests/Makefile, without -static
DISK_BYTES = 16 << 20
KEYS = {"device", "bs", "qd", "seconds", "ios", "errors", "first_error", "lost", "stalled", "stall_seconds", "iops",
        "lat_us", "churn", "verify"}
VERIFY_KEYS = {"blocks", "write_pct", "phase", "reads", "writes", "fill_writes", "sweep_reads", "unverified", "corrupt",
               "stale", "misdirected", "damaged", "corrupt_blocks"}
PROGRESS_KEYS = {"t", "phase", "ios", "reads", "writes", "errors", "corrupt", "stalled", "inflight", "stalled_now",
                 "oldest_ms", "moves", "move_failures"}
BS = 4096


@pytest.fixture(scope="module")
def iogen(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no host gcc to build guests/linux/iogen.c natively")
    exe = tmp_path_factory.mktemp("iogen") / "iogen"
    r = subprocess.run(["gcc", *CFLAGS, "-o", str(exe), str(SRC)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


def _o_direct_reason(directory: Path) -> str | None:
    """None if a file in `directory` can be opened and read with O_DIRECT, else why not."""
    probe = directory / "o_direct_probe"
    try:
        probe.write_bytes(b"\0" * 4096)
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    finally:
        probe.unlink(missing_ok=True)
    return None


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """A 16 MiB file of data on a file system with O_DIRECT (tmp_path may be a tmpfs without it)."""
    reasons = []
    tmp = tmp_path_factory.mktemp("iogen-disk")
    reason = _o_direct_reason(tmp)
    if reason is None:
        yield _fill(tmp / "disk")
        return
    reasons.append(reason)
    parent = ROOT / ".pytest-iogen"
    parent.mkdir(exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=parent) as d:
            reason = _o_direct_reason(Path(d))
            if reason is not None:
                reasons.append(reason)
                pytest.skip("no directory supports O_DIRECT: " + "; ".join(reasons))
            yield _fill(Path(d) / "disk")
    finally:
        try:
            parent.rmdir()
        except OSError:
            pass  # not empty: someone else's run is using it


def _fill(path: Path) -> Path:
    block = bytes(range(256)) * 4096  # 1 MiB, not sparse: the reads reach the disk
    with open(path, "wb") as f:
        for _ in range(DISK_BYTES // len(block)):
            f.write(block)
    return path


def run(exe: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    if not lines:
        return r, None
    assert len(lines) == 1, r.stdout
    tag, _, body = lines[0].partition(" ")
    assert tag == "KVMITS-IOGEN", lines[0]
    return r, json.loads(body)


@pytest.mark.parametrize("qd", [1, 16])
def test_random_reads_at_queue_depth(iogen, disk, qd):
    r, out = run(iogen, str(disk), "--qd", str(qd), "--seconds", "0.5")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert set(out) == KEYS
    assert out["device"] == str(disk) and out["bs"] == 4096 and out["qd"] == qd
    assert out["ios"] > 0 and out["errors"] == 0 and out["first_error"] is None and out["lost"] == 0
    assert 0.5 <= out["seconds"] < 10
    assert out["iops"] == pytest.approx(out["ios"] / out["seconds"], rel=1e-3)
    lat = out["lat_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"] and 0 < lat["mean"] <= lat["max"]
    assert out["churn"] is None and out["verify"] is None
    assert out["stalled"] == 0 and out["stall_seconds"] == 10


def test_bad_device_path_is_a_setup_error(iogen, tmp_path):
    missing = tmp_path / "no-such-disk"
    r, out = run(iogen, str(missing), "--qd", "1", "--seconds", "0.1")
    assert r.returncode == 2 and out is None
    assert r.stderr.startswith("iogen: ") and str(missing) in r.stderr
    assert os.strerror(errno.ENOENT) in r.stderr


def test_churn_on_a_missing_irq_counts_failures_not_io_errors(iogen, disk):
    r, out = run(iogen, str(disk), "--qd", "4", "--seconds", "0.5",
                 "--churn", "999999", "--churn-hz", "50", "--cpus", "2")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert out["ios"] > 0 and out["errors"] == 0 and out["lost"] == 0
    churn = out["churn"]
    assert churn["irqs"] == [999999] and churn["hz"] == 50
    assert churn["moves"] == 0 and churn["move_failures"] > 0
    assert churn["first_errno"] == errno.ENOENT


# -- --verify ---------------------------------------------------------------------------------------
VDISK_BLOCKS = 1024          # 4 MiB: the fill and the sweep take milliseconds natively


@pytest.fixture
def vdisk(disk):
    """A fresh zeroed 4 MiB file for one --verify test, beside `disk` (where O_DIRECT works)."""
    path = disk.parent / "vdisk"
    with open(path, "wb") as f:
        f.write(b"\0" * (VDISK_BLOCKS * BS))
    yield path
    path.unlink(missing_ok=True)


def parse_lines(stdout: str) -> tuple[list[dict], dict | None]:
    """(progress lines, final report) of iogen's stdout; asserts every line is one of the two."""
    progress, final = [], None
    for line in stdout.splitlines():
        tag, _, body = line.partition(" ")
        assert tag in ("KVMITS-IOGEN-PROGRESS", "KVMITS-IOGEN") and final is None, line
        if tag == "KVMITS-IOGEN":
            final = json.loads(body)
        else:
            progress.append(json.loads(body))
    return progress, final


class Running:
    """iogen in the background, its stdout read line by line (to act between its phases)."""

    def __init__(self, exe: Path, *args: str):
        self.proc = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def progress_until(self, pred) -> dict:
        """Read progress lines until one satisfies pred; that line."""
        for line in self.proc.stdout:
            self.lines.append(line)
            tag, _, body = line.partition(" ")
            assert tag == "KVMITS-IOGEN-PROGRESS", (line, self.proc.stderr.read())
            p = json.loads(body)
            if pred(p):
                return p
        raise AssertionError(f"iogen ended before the expected progress line: {''.join(self.lines)}")

    def finish(self) -> tuple[int, list[dict], dict]:
        rest, err = self.proc.communicate(timeout=60)
        progress, final = parse_lines("".join(self.lines) + rest)
        assert final is not None, err
        return self.proc.returncode, progress, final


def rewrite(path: Path, offset: int, data: bytes) -> None:
    """Change the file under iogen: a buffered write made durable (iogen's O_DIRECT reads write
    back and drop the page cache's copy of their range first, so they see it)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_verify_clean_run_writes_fills_and_sweeps(iogen, vdisk):
    r = subprocess.run([str(iogen), str(vdisk), "--verify", "--qd", "8", "--seconds", "0.5", "--progress", "0.1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    progress, out = parse_lines(r.stdout)
    assert set(out) == KEYS and set(out["verify"]) == VERIFY_KEYS
    v = out["verify"]
    assert v["blocks"] == VDISK_BLOCKS and v["write_pct"] == 50 and v["phase"] == "sweep"
    assert v["fill_writes"] == VDISK_BLOCKS and v["sweep_reads"] == VDISK_BLOCKS and v["unverified"] == 0
    assert v["reads"] > VDISK_BLOCKS and v["writes"] > VDISK_BLOCKS     # the mixed phase did both
    assert v["reads"] + v["writes"] == out["ios"]
    assert v["corrupt"] == v["stale"] == v["misdirected"] == v["damaged"] == 0 and v["corrupt_blocks"] == []
    assert out["errors"] == out["lost"] == out["stalled"] == 0
    # progress: every 0.1 s of the 0.5 s mixed phase at least, counts that only grow
    assert len(progress) >= 4 and all(set(p) == PROGRESS_KEYS for p in progress)
    assert [p["t"] for p in progress] == sorted(p["t"] for p in progress)
    assert [p["ios"] for p in progress] == sorted(p["ios"] for p in progress) and progress[-1]["ios"] <= out["ios"]
    assert {p["phase"] for p in progress} <= {"fill", "mixed", "sweep"} and "mixed" in {p["phase"] for p in progress}
    assert all(0 <= p["inflight"] <= 8 and p["stalled_now"] == 0 for p in progress)


def test_verify_blocks_on_disk_are_the_documented_format(iogen, vdisk):
    r = subprocess.run([str(iogen), str(vdisk), "--verify", "--qd", "4", "--seconds", "0.1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = vdisk.read_bytes()
    gens = []
    for block in (0, 1, VDISK_BLOCKS - 1):
        b = data[block * BS:(block + 1) * BS]
        magic, number, gen, checksum = struct.unpack_from("<4Q", b)
        assert magic.to_bytes(8, "little") == b"KMTSBLK1" and number == block and gen >= 1
        h = 0xCBF29CE484222325                                  # FNV-1a-64 of all but the checksum
        for byte in b[:24] + b[32:]:
            h = ((h ^ byte) * 0x100000001B3) & (1 << 64) - 1
        assert checksum == h
        gens.append(gen)
    assert len({data[i * BS + 32:(i + 1) * BS] for i in range(3)}) == 3   # the payloads differ


def test_verify_finds_damaged_blocks(iogen, vdisk):
    # reads only after the fill: nothing but iogen's own repair (a block found corrupt is written
    # afresh when next picked, or skipped by the sweep) touches what the test breaks, so every
    # broken block is found exactly once
    run_ = Running(iogen, str(vdisk), "--verify", "--write-pct", "0", "--qd", "8", "--seconds", "3",
                   "--progress", "0.05")
    run_.progress_until(lambda p: p["phase"] == "mixed")
    broken = range(100, 110)
    for block in broken:
        rewrite(vdisk, block * BS + 1000, b"\xff\x00\xff\x00")  # in the payload: header intact
    rc, progress, out = run_.finish()
    assert rc == 1
    v = out["verify"]
    assert v["corrupt"] == v["damaged"] == len(broken) and v["stale"] == v["misdirected"] == 0
    assert len(v["corrupt_blocks"]) == 8 and set(v["corrupt_blocks"]) <= set(broken)
    repaired = v["writes"] - v["fill_writes"]
    assert repaired + v["unverified"] <= len(broken) and v["sweep_reads"] == VDISK_BLOCKS - v["unverified"]
    assert out["errors"] == out["lost"] == 0
    assert progress[-1]["corrupt"] <= v["corrupt"]


def test_verify_finds_a_misdirected_block(iogen, vdisk):
    run_ = Running(iogen, str(vdisk), "--verify", "--write-pct", "0", "--qd", "4", "--seconds", "2",
                   "--progress", "0.05")
    run_.progress_until(lambda p: p["phase"] == "mixed")
    rewrite(vdisk, 7 * BS, vdisk.read_bytes()[5 * BS:6 * BS])   # block 5's valid contents at block 7
    rc, _, out = run_.finish()
    assert rc == 1
    v = out["verify"]
    assert (v["corrupt"], v["misdirected"], v["stale"], v["damaged"]) == (1, 1, 0, 0)
    assert v["corrupt_blocks"] == [7]


def test_verify_finds_stale_blocks_after_lost_writes(iogen, vdisk):
    # the disk goes back to what it held earlier in the run: every block written in between and
    # not again since holds a whole, valid block of an older generation
    run_ = Running(iogen, str(vdisk), "--verify", "--qd", "4", "--seconds", "3", "--progress", "0.05")
    first = run_.progress_until(lambda p: p["phase"] == "mixed")
    snapshot = vdisk.read_bytes()
    run_.progress_until(lambda p: p["writes"] >= first["writes"] + 4 * VDISK_BLOCKS)
    rewrite(vdisk, 0, snapshot)
    rc, _, out = run_.finish()
    assert rc == 1
    v = out["verify"]
    assert v["stale"] > 0 and v["misdirected"] == 0
    assert v["corrupt"] == v["stale"] + v["damaged"]    # a block torn by the rewrite is damaged
    assert out["errors"] == out["lost"] == 0


def test_stalled_ios_fail_the_run(iogen, disk):
    # every I/O outlives a 1 us bound: each one is counted, and the run fails
    r, out = run(iogen, str(disk), "--qd", "2", "--seconds", "0.2", "--stall-seconds", "0.000001")
    assert r.returncode == 1
    assert out["stalled"] == out["ios"] > 0 and out["errors"] == out["lost"] == 0
    assert out["stall_seconds"] == 1e-6


@pytest.mark.parametrize("args, why", [
    (["--write-pct", "10"], "--write-pct"),
    (["--verify", "--write-pct", "101"], "--write-pct 101"),
    (["--verify", "--qd", "1024"], "more blocks than --qd"),
    (["--progress", "0"], "--progress 0"),
    (["--stall-seconds", "-1"], "--stall-seconds -1"),
])
def test_verify_option_errors(iogen, vdisk, args, why):
    base = ["--qd", "1", "--seconds", "0.1"]
    r = subprocess.run([str(iogen), str(vdisk), *base, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert why in r.stderr, r.stderr


def _arm64_prefix() -> str | None:
    prefix = "" if platform.machine() in ("aarch64", "arm64") else "aarch64-linux-gnu-"
    return prefix if shutil.which(prefix + "gcc") else None


def test_make_builds_a_static_aarch64_elf(tmp_path):
    prefix = _arm64_prefix()
    if prefix is None or shutil.which("make") is None:
        pytest.skip("no arm64 C compiler (Debian: gcc-aarch64-linux-gnu on x86_64, gcc on arm64) or no make")
    libc = subprocess.run([prefix + "gcc", "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    if libc == "libc.a":
        pytest.skip(f"no static libc for {prefix}gcc (libc6-dev-arm64-cross on x86_64, libc6-dev on arm64)")
    r = subprocess.run(["make", "-C", str(ROOT / "guests"), f"B={tmp_path}", f"{tmp_path}/iogen"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    elf = (tmp_path / "iogen").read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1     # ELF64, little-endian
    (machine,) = struct.unpack_from("<H", elf, 18)
    assert machine == 183                                             # EM_AARCH64
    (phoff,) = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 1 in types                                                 # a PT_LOAD: the table was read
    assert 3 not in types                                             # no PT_INTERP: static
