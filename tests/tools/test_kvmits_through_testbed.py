"""`kvmits test` and `kvmits run` on a host without arm64 KVM, end to end through the real arm64
testbed (issue 17): a user's test file from outside the source tree passes with both ITSes, a
copy with a wrong expectation fails with a readable assertion, and `kvmits run` of hello and of
the agent gives the same console and exit status as the same command inside the testbed. Each
run boots the testbed (10-30 s), so it needs qemu-system-aarch64."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tests" / "test_first_its.py"

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                       reason="needs qemu-system-aarch64 (apt-get install qemu-system-arm) to boot the testbed"),
    pytest.mark.skipif(platform.machine() == "aarch64", reason="an arm64 host runs these natively, not in the testbed"),
]


def kvmits(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmits", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_users_test_file_passes_on_both_itses_through_kvmits_test(tmp_path):
    mine = tmp_path / "mytests" / "test_first_its.py"         # outside the source tree
    mine.parent.mkdir()
    shutil.copy(EXAMPLE, mine)
    out = kvmits("test", str(mine), "--pytest-args=-v", cwd=tmp_path)
    detail = f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-2000:]}"
    assert out.returncode == 0, detail
    assert "6 passed" in out.stdout, detail                    # 3 tests x 2 ITS kinds
    for kind in ("kernel", "user"):
        assert f"test_an_msi_arrives_on_the_vcpu_of_its_collection[{kind}] PASSED" in out.stdout, detail


def test_a_wrong_expectation_fails_with_a_readable_assertion(tmp_path):
    wrong = tmp_path / "test_wrong.py"
    text = EXAMPLE.read_text()
    assert "its_lab.expect(cpu=2, intid=LPI)" in text
    wrong.write_text(text.replace("its_lab.expect(cpu=2, intid=LPI)", "its_lab.expect(cpu=1, intid=LPI)"))
    out = kvmits("test", str(wrong), "--its", "user", cwd=tmp_path)
    detail = f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-2000:]}"
    assert out.returncode == 1, detail                          # pytest's "tests failed"
    assert "1 failed, 2 passed" in out.stdout, detail
    assert "AssertionError: LPI 8200 was taken on vCPU(s) [2], expected once on vCPU 1" in out.stdout, detail


@pytest.fixture(scope="module")
def guests():
    make = subprocess.run(["make", "-C", str(ROOT / "guests")], capture_output=True, text=True, check=False)
    if make.returncode != 0:
        pytest.skip(f"make -C guests failed (the aarch64 cross compiler?): {make.stderr[-500:]}")
    return ROOT / "guests" / "build"


@pytest.mark.parametrize("name, extra", [("hello", []), ("agent", ["--agent", "--timeout", "5"])])
def test_kvmits_run_on_this_host_is_the_same_as_inside_the_testbed(guests, tmp_path, name, extra):
    image = tmp_path / f"{name}.bin"                            # a copy: a file the testbed must carry
    shutil.copy(guests / f"{name}.bin", image)
    here = kvmits("run", str(image), *extra, cwd=tmp_path)
    inside = subprocess.run([sys.executable, str(ROOT / "tools" / "testbed"), "run", "-q", "--", "python3", "-m",
                             "kvmits", "run", f"guests/build/{name}.bin", *extra],
                            cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
                            check=False)
    detail = f"here:\n{here.stdout}\n{here.stderr[-1500:]}\ninside:\n{inside.stdout}\n{inside.stderr[-1500:]}"
    assert here.returncode == inside.returncode, detail
    assert here.returncode == (0 if name == "hello" else 124), detail
    assert here.stdout == inside.stdout and here.stdout.strip(), detail
    assert "running in the arm64 testbed" in here.stderr, detail


def test_pytest_with_kvmits_kernel_runs_the_session_in_the_testbed_on_that_kernel(tmp_path):
    """The plugin's --kvmits-kernel: plain pytest on this host, the session in the testbed."""
    mine = tmp_path / "test_first_its.py"
    shutil.copy(EXAMPLE, mine)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--kvmits-kernel", "bookworm",
                          "--kvmits-its", "kernel", mine.name], cwd=tmp_path, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=900, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    detail = f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-2000:]}"
    assert out.returncode == 0, detail
    assert "running this session in the arm64 testbed on --kernel bookworm" in out.stdout, detail
    assert "kvmits: ITS kinds kernel, 4 vCPUs, kernel 6.1." in out.stdout and "3 passed" in out.stdout, detail
