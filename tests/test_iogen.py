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
KEYS = {"device", "bs", "qd", "seconds", "ios", "errors", "first_error", "lost", "iops", "lat_us", "churn"}


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
    assert out["churn"] is None


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
