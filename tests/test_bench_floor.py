"""The C floor of `kvmits bench`'s exit-loop figure: its guest code is the Python side's, it builds
from benchmarks/c, and tools/testbed ships the build to the testbed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmits.bench import exitloop
from kvmits.bench import x86guest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = (ROOT / "benchmarks" / "c" / "exit_floor.c").read_text()


def test_x86_guest_is_the_real_mode_loop_of_the_python_tests():
    array = re.search(r"static const uint8_t guest\[\] = \{([^}]*)\}", SOURCE).group(1)
    assert bytes(int(b, 16) for b in array.replace(",", " ").split()) == x86guest.LOOP


def test_a64_guest_is_the_same_words_in_c_and_python():
    array = re.search(r"static const uint32_t guest\[\] = \{([^}]*)\}", SOURCE).group(1)
    words = [int(w, 16) for w in array.replace(",", " ").split()]
    assert b"".join(w.to_bytes(4, "little") for w in words) == exitloop.A64_LOOP


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-objdump") is None, reason="no aarch64-linux-gnu-objdump "
                    "(binutils-aarch64-linux-gnu, installed by tools/bootstrap) to disassemble the A64 loop")
def test_a64_loop_disassembles_to_load_add_store_branch(tmp_path):
    blob = tmp_path / "loop.bin"
    blob.write_bytes(exitloop.A64_LOOP)
    out = subprocess.run(["aarch64-linux-gnu-objdump", "-D", "-b", "binary", "-m", "aarch64", str(blob)],
                         capture_output=True, text=True, check=True).stdout
    insns = [" ".join(line.split("\t")[2:]).split("//")[0].strip() for line in out.splitlines()
             if re.match(r"\s+[0-9a-f]+:\t", line)]
    assert insns == ["mov x1, #0x10000000", "ldr w0, [x1]", "add w0, w0, #0x1", "str w0, [x1, #4]", "b 0x4"]
    assert exitloop.A64_MMIO == 0x1000_0000


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None, reason="no make or cc")
def test_floor_builds_from_source(tmp_path):
    shutil.copy(ROOT / "benchmarks" / "c" / "exit_floor.c", tmp_path)
    shutil.copy(ROOT / "benchmarks" / "c" / "Makefile", tmp_path)
    proc = subprocess.run(["make", "-C", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = sorted(p.name for p in (tmp_path / "build").iterdir())
    assert any(name.startswith("exit_floor-") for name in built)


def test_testbed_job_ships_the_floor_build(tmp_path, monkeypatch):
    tools = str(ROOT / "tools")
    if tools not in sys.path:
        monkeypatch.syspath_prepend(tools)
    from testbed_lib import job

    (tmp_path / "benchmarks" / "c" / "build").mkdir(parents=True)
    (tmp_path / "benchmarks" / "c" / "build" / "exit_floor-aarch64").write_bytes(b"\x7fELF")
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(job, "git_files", lambda root: ["pyproject.toml"])
    assert job.select_files(tmp_path) == ["benchmarks/c/build/exit_floor-aarch64", "pyproject.toml"]
