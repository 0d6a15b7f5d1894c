import io
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from testbed_lib import job
from testbed_lib.errors import TestbedError

from .newc_reader import read_archives


def test_parse_ls_files_nul_separated_with_odd_names():
    out = b"kvmits/__init__.py\0tests/a b.py\0tools/new\nline\0"
    assert job.parse_ls_files(out) == ["kvmits/__init__.py", "tests/a b.py", "tools/new\nline"]
    assert job.parse_ls_files(b"") == []


def _tree(fs):
    for p in ("/src/kvmits/__init__.py", "/src/kvmits/cli/__init__.py", "/src/tests/test_x.py",
              "/src/tools/testbed", "/src/pyproject.toml", "/src/README.md",
              "/src/guests/build/agent.bin", "/src/guests/build/sub/hello.bin", "/src/guests/agent.c",
              "/src/kvmits/__pycache__/x.cpython-311.pyc", "/src/tests/.pytest_cache/v/x"):
        fs.create_file(p, contents=p)
    return Path("/src")


def test_select_files_from_git_keeps_existing_files_and_adds_guest_build(fs, monkeypatch):
    root = _tree(fs)
    listed = ["kvmits/__init__.py", "tests/test_x.py", "tools/testbed", "pyproject.toml",
              "kvmits/deleted_but_staged.py"]
    monkeypatch.setattr(job, "git_files", lambda r: list(listed))
    assert job.select_files(root) == [
        "guests/build/agent.bin", "guests/build/sub/hello.bin", "kvmits/__init__.py",
        "pyproject.toml", "tests/test_x.py", "tools/testbed"]


def test_select_files_walks_when_not_a_git_tree(fs, monkeypatch):
    root = _tree(fs)
    monkeypatch.setattr(job, "git_files", lambda r: None)
    files = job.select_files(root)
    assert files == [
        "guests/build/agent.bin", "guests/build/sub/hello.bin", "kvmits/__init__.py",
        "kvmits/cli/__init__.py", "pyproject.toml", "tests/test_x.py", "tools/testbed"]
    # not under JOB_PATHS, or caches
    assert "README.md" not in files and "guests/agent.c" not in files


def test_select_files_without_guest_build(fs, monkeypatch):
    fs.create_file("/src/pyproject.toml")
    monkeypatch.setattr(job, "git_files", lambda r: ["pyproject.toml"])
    assert job.select_files(Path("/src")) == ["pyproject.toml"]


def test_git_files_on_a_real_work_tree(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    git("init", "-q")
    for rel in ("kvmits/a.py", "kvmits/untracked.py", "kvmits/ignored.log", "docs/x.md", "pyproject.toml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / ".gitignore").write_text("*.log\n")
    git("add", "kvmits/a.py", "pyproject.toml")
    assert sorted(job.git_files(tmp_path)) == ["kvmits/a.py", "kvmits/untracked.py", "pyproject.toml"]


def test_git_files_none_outside_a_work_tree(tmp_path):
    assert job.git_files(tmp_path) is None


def test_parse_env():
    assert job.parse_env(["A=1", "B_2=x=y", "C="]) == {"A": "1", "B_2": "x=y", "C": ""}
    for bad in ("NOEQUALS", "1A=x", "A-B=x", "=x"):
        with pytest.raises(ValueError):
            job.parse_env([bad])


def test_run_script_quotes_the_command_for_a_posix_shell(tmp_path):
    argv = [sys.executable, "-c",
            "import json, os, sys; print(json.dumps([os.getcwd(), sys.argv[1:], "
            "os.environ['FOO'], os.environ['PYTHONPATH']]))",
            "two words", "it's", "$HOME", "*", "", "back\\slash"]
    script = job.run_script(argv, {"FOO": "a b'c\"$d"}, src=str(tmp_path))
    path = tmp_path / "run"
    path.write_text(script)
    out = subprocess.run(["/bin/sh", str(path)], capture_output=True, text=True, check=True).stdout
    cwd, args, foo, pythonpath = json.loads(out)
    assert cwd == str(tmp_path) and pythonpath == str(tmp_path)
    assert args == ["two words", "it's", "$HOME", "*", "", "back\\slash"]
    assert foo == "a b'c\"$d"


def test_run_script_passes_the_exit_status_and_fails_when_src_is_missing(tmp_path):
    ok = tmp_path / "ok"
    ok.write_text(job.run_script(["sh", "-c", "exit 42"], {}, src=str(tmp_path)))
    assert subprocess.run(["/bin/sh", str(ok)]).returncode == 42
    missing = tmp_path / "missing"
    missing.write_text(job.run_script(["true"], {}, src=str(tmp_path / "nope")))
    assert subprocess.run(["/bin/sh", str(missing)], capture_output=True).returncode == 125


def test_run_script_needs_a_command():
    with pytest.raises(ValueError):
        job.run_script([], {})


def test_write_job_layout(fs):
    fs.create_file("/src/kvmits/__init__.py", contents="x = 1\n")
    fs.create_file("/src/tools/testbed", contents="#!/usr/bin/env python3\n", st_mode=stat.S_IFREG | 0o755)
    buf = io.BytesIO()
    job.write_job(buf, Path("/src"), ["kvmits/__init__.py", "tools/testbed"], "#!/bin/sh\nexec true\n")
    [entries] = read_archives(buf.getvalue())
    by = {e.name: e for e in entries}
    assert [e.name for e in entries] == ["job", "job/run", "job/src", "job/src/kvmits", "job/src/tools",
                                         "job/src/kvmits/__init__.py", "job/src/tools/testbed"]
    assert stat.S_IMODE(by["job/run"].mode) == 0o755 and by["job/run"].data.startswith(b"#!/bin/sh")
    assert by["job/src/kvmits/__init__.py"].data == b"x = 1\n"
    assert stat.S_IMODE(by["job/src/tools/testbed"].mode) == 0o755


def test_make_guests_skipped_without_makefile(tmp_path, monkeypatch):
    monkeypatch.setattr(job.subprocess, "run", lambda *a, **k: pytest.fail("make must not run"))
    job.make_guests(tmp_path)


def test_make_guests_failure_is_a_testbed_error(tmp_path, monkeypatch):
    if shutil.which("make") is None:
        pytest.skip("no make on this host (Debian package make)")
    (tmp_path / "guests").mkdir()
    (tmp_path / "guests" / "Makefile").write_text("all:\n\tfalse\n")
    monkeypatch.setattr(job.host, "ensure_programs", lambda programs, why: None)
    with pytest.raises(TestbedError, match="make -C guests' failed with status 2") as exc:
        job.make_guests(tmp_path)
    assert exc.value.status == 125
