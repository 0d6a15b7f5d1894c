"""tools/testbed run --file PATH: the host -> guest mapping, the checks before boot, the size
guard and the entries in the job archive (read back with the independent newc reader)."""

import io
import os
import stat
from pathlib import Path

import pytest

from testbed_lib import cli, job
from testbed_lib.errors import EXIT_USAGE, TestbedError

from .newc_reader import read_archives

SCRIPT = "#!/bin/sh\nexec true\n"


# -- guest_path ----------------------------------------------------------------------------

def test_files_dir_is_under_the_job_dir():
    assert job.FILES_DIR == "/job/files" == f"{job.JOB_DIR}/files"


@pytest.mark.parametrize("host, cwd, guest", [
    ("/home/u/tests/test_a.py", None, "/job/files/home/u/tests/test_a.py"),
    ("/home/u/tests/test_a.py", "/elsewhere", "/job/files/home/u/tests/test_a.py"),  # cwd unused
    ("tests/test_a.py", "/home/u", "/job/files/home/u/tests/test_a.py"),
    ("./tests/./x", "/home/u", "/job/files/home/u/tests/x"),
    ("../v/x", "/home/u", "/job/files/home/v/x"),
    ("/home/u/a/../b//c/", None, "/job/files/home/u/b/c"),
    ("/../../etc/x", None, "/job/files/etc/x"),           # cannot climb out of /job/files
    ("//home/u/x", None, "/job/files/home/u/x"),           # POSIX's '//' prefix too
    ("/", None, "/job/files"),
    (".", "/home/u", "/job/files/home/u"),
    ("..", "/", "/job/files"),
])
def test_guest_path(host, cwd, guest):
    assert job.guest_path(host, cwd) == guest


def test_guest_path_of_a_relative_path_uses_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert job.guest_path("sub/f.py") == f"/job/files{os.getcwd()}/sub/f.py"
    assert job.guest_path(Path("sub") / "f.py") == f"/job/files{os.getcwd()}/sub/f.py"


def test_guest_path_does_not_resolve_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path / "real")
    # textual: d/link/.. is d, not real's parent
    assert job.guest_path(f"{tmp_path}/d/link/../x") == f"/job/files{tmp_path}/d/x"


def test_guest_path_needs_an_absolute_cwd():
    with pytest.raises(ValueError):
        job.guest_path("x", "relative/dir")


# -- the archive ---------------------------------------------------------------------------

def _archive(carried, root=Path("/nonexistent-src"), files=()):
    buf = io.BytesIO()
    job.write_job(buf, root, list(files), SCRIPT, carried)
    [entries] = read_archives(buf.getvalue())
    return entries


def _by_name(entries):
    names = [e.name for e in entries]
    assert len(names) == len(set(names)), f"duplicate entries: {names}"
    for i, e in enumerate(entries):
        # the kernel's unpacker makes no missing directories: each parent comes first, as a dir
        parent = e.name.rpartition("/")[0]
        if parent:
            assert parent in names[:i], f"{e.name} before its parent"
            assert stat.S_ISDIR(entries[names.index(parent)].mode)
    return {e.name: e for e in entries}


def _g(host) -> str:
    """The archive name (no leading '/') of a host path."""
    return job.guest_path(os.fspath(host)).lstrip("/")


def test_write_job_carries_files_executables_trees_and_relative_paths(tmp_path, monkeypatch):
    plain = tmp_path / "test_a.py"
    plain.write_text("def test_a(): pass\n")
    plain.chmod(0o640)
    exe = tmp_path / "bin" / "tool.sh"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "top.txt").write_bytes(b"top")
    (tree / "sub" / "deeper" / "nested.bin").write_bytes(bytes(range(256)) * 3)
    (tree / "sub").chmod(0o750)
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "r.txt").write_text("relative\n")
    monkeypatch.chdir(tmp_path)

    carried = job.collect_files([str(plain), str(exe), str(tree), "rel/r.txt"])
    by = _by_name(_archive(carried))

    assert by["job/run"].data == SCRIPT.encode()
    assert "job/files" in by and stat.S_IMODE(by["job/files"].mode) == 0o755
    f = by[_g(plain)]
    assert f.name == f"job/files{tmp_path}/test_a.py"
    assert stat.S_ISREG(f.mode) and stat.S_IMODE(f.mode) == 0o640
    assert f.data == b"def test_a(): pass\n" and f.uid == f.gid == 0
    assert f.mtime == int(plain.stat().st_mtime)
    e = by[_g(exe)]
    assert stat.S_IMODE(e.mode) == 0o755 and e.data.startswith(b"#!/bin/sh")
    assert by[_g(tree / "top.txt")].data == b"top"
    nested = by[f"job/files{tmp_path}/tree/sub/deeper/nested.bin"]
    assert nested.data == bytes(range(256)) * 3
    assert stat.S_ISDIR(by[_g(tree / "empty")].mode)
    assert stat.S_IMODE(by[_g(tree / "sub")].mode) == 0o750  # a carried directory keeps its mode
    assert stat.S_IMODE(by[_g(tmp_path)].mode) == 0o755      # one above PATH: made, 0755
    assert by[f"job/files{tmp_path}/rel/r.txt"].data == b"relative\n"
    # nothing beside what was asked (bin/ holds only tool.sh; rel/ only r.txt: both named files)
    assert sorted(n for n, x in by.items() if stat.S_ISREG(x.mode) and n.startswith("job/files")) == sorted(
        _g(p) for p in (plain, exe, tree / "top.txt", tree / "sub/deeper/nested.bin",
                        tmp_path / "rel/r.txt"))


def test_write_job_keeps_the_source_copy_next_to_the_files(tmp_path):
    (tmp_path / "src" / "kvmits").mkdir(parents=True)
    (tmp_path / "src" / "kvmits" / "__init__.py").write_text("x = 1\n")
    (tmp_path / "f").write_text("f")
    by = _by_name(_archive(job.collect_files([str(tmp_path / "f")]), root=tmp_path / "src",
                           files=["kvmits/__init__.py"]))
    assert by["job/src/kvmits/__init__.py"].data == b"x = 1\n"
    assert by[_g(tmp_path / "f")].data == b"f"
    assert [n for n in by if n == "job"] == ["job"]


def test_write_job_without_files_has_no_files_dir(tmp_path):
    by = _by_name(_archive([]))
    assert not any(n.startswith("job/files") for n in by)


def test_overlapping_paths_are_carried_once(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"12345")
    carried = job.collect_files([str(tmp_path / "d"), str(tmp_path / "d" / "x"),
                                 f"{tmp_path}/d/../d/x"])
    assert [c.guest for c in carried] == [job.guest_path(str(tmp_path / "d")),
                                          job.guest_path(str(tmp_path / "d" / "x"))]
    assert job.payload_bytes(carried) == 5
    _by_name(_archive(carried))  # no duplicate entries


def test_a_symlink_given_as_path_is_followed(tmp_path):
    (tmp_path / "target.sh").write_text("#!/bin/sh\n")
    (tmp_path / "target.sh").chmod(0o755)
    (tmp_path / "link.sh").symlink_to("target.sh")
    (tmp_path / "realdir").mkdir()
    (tmp_path / "realdir" / "in.txt").write_text("in")
    (tmp_path / "dirlink").symlink_to("realdir")
    by = _by_name(_archive(job.collect_files([str(tmp_path / "link.sh"), str(tmp_path / "dirlink")])))
    link = by[_g(tmp_path / "link.sh")]
    assert stat.S_ISREG(link.mode) and stat.S_IMODE(link.mode) == 0o755 and link.data == b"#!/bin/sh\n"
    assert stat.S_ISDIR(by[_g(tmp_path / "dirlink")].mode)
    assert by[_g(tmp_path / "dirlink" / "in.txt")].data == b"in"
    assert _g(tmp_path / "realdir") not in by


def test_symlinks_and_fifos_inside_a_directory_are_skipped_with_a_warning(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "ok.txt").write_text("ok")
    (d / "to_ok").symlink_to("ok.txt")
    (d / "dangling").symlink_to("nowhere")
    os.mkfifo(d / "pipe")
    carried = job.collect_files([str(d)])
    assert [c.host for c in carried] == [str(d), str(d / "ok.txt")]
    err = capsys.readouterr().err
    assert f"skipping symlink {d}/to_ok" in err and f"skipping symlink {d}/dangling" in err
    assert f"skipping {d}/pipe: a FIFO" in err


# -- errors, before anything boots ---------------------------------------------------------

def _refused(paths, match, **kw):
    with pytest.raises(TestbedError, match=match) as exc:
        job.collect_files(paths, **kw)
    assert exc.value.status == EXIT_USAGE == 2
    return str(exc.value)


def test_a_missing_path_is_refused(tmp_path, monkeypatch):
    _refused([str(tmp_path / "nope.py")], f"--file '{tmp_path}/nope.py': no such file or directory")
    monkeypatch.chdir(tmp_path)
    msg = _refused(["sub/nope.py"], "no such file or directory")
    assert "'sub/nope.py'" in msg and f"({tmp_path}/sub/nope.py)" in msg


def test_a_dangling_symlink_as_path_is_refused(tmp_path):
    (tmp_path / "dangling").symlink_to("nowhere")
    _refused([str(tmp_path / "dangling")], "dangling'.*no such file")


def test_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    _refused([str(tmp_path / "pipe")], f"{tmp_path}/pipe'.*is a FIFO, neither a regular file nor a directory")


def test_a_device_is_refused():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    _refused(["/dev/null"], "'/dev/null': is a character device")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway (see the "
                                                "simulated test below)")
def test_an_unreadable_file_is_refused(tmp_path):
    f = tmp_path / "secret"
    f.write_text("x")
    f.chmod(0)
    try:
        _refused([str(f)], f"{f}'.*not readable")
        d = tmp_path / "d"
        d.mkdir()
        (d / "secret").write_text("x")
        (d / "secret").chmod(0)
        _refused([str(d)], f"{d}/secret.*not readable")  # inside a directory: refused, too
    finally:
        f.chmod(0o600)


def test_an_unreadable_path_is_refused_simulated(tmp_path, monkeypatch):
    # as root, os.access says yes to everything: make it say no, then make open() fail
    f = tmp_path / "secret"
    f.write_text("x")
    real_access = os.access
    monkeypatch.setattr(job.os, "access", lambda p, m: False if os.fspath(p) == str(f) else real_access(p, m))
    _refused([str(f)], f"{f}'.*not readable")
    _refused([str(tmp_path)], f"{f}.*not readable")
    monkeypatch.setattr(job.os, "access", real_access)

    real_open = os.open

    def no_open(path, *a, **k):
        if os.fspath(path) == str(f):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)
    monkeypatch.setattr(job.os, "open", no_open)
    _refused([str(f)], f"{f}'.*cannot be read: Permission denied")


def test_an_unlistable_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()

    def no_scandir(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(job.os, "scandir", no_scandir)
    _refused([str(tmp_path / "d")], "d'.*cannot be read: Permission denied")


def test_a_file_replaced_by_a_fifo_before_packing_is_refused_without_hanging(tmp_path):
    (tmp_path / "f").write_text("x")
    carried = job.collect_files([str(tmp_path / "f")])
    (tmp_path / "f").unlink()
    os.mkfifo(tmp_path / "f")
    with pytest.raises(TestbedError, match="no longer a regular file") as exc:
        _archive(carried)
    assert exc.value.status == 2


def test_a_file_that_vanished_before_packing_is_a_usage_error(tmp_path):
    (tmp_path / "f").write_text("x")
    carried = job.collect_files([str(tmp_path / "f")])
    (tmp_path / "f").unlink()
    with pytest.raises(TestbedError, match=f"cannot read {tmp_path}/f") as exc:
        _archive(carried)
    assert exc.value.status == 2


# -- the size guard ------------------------------------------------------------------------

def test_the_size_limit_is_256_mib():
    assert job.FILES_MAX_BYTES == 256 * 1024 * 1024


def test_more_than_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "FILES_MAX_BYTES", 10)
    (tmp_path / "a").write_bytes(b"x" * 6)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"x" * 4)
    assert job.payload_bytes(job.collect_files([str(tmp_path / "a"), str(tmp_path / "d")])) == 10
    (tmp_path / "d" / "c").write_bytes(b"x")
    msg = _refused([str(tmp_path / "a"), str(tmp_path / "d")], "more than the limit")
    assert "11 bytes" in msg and "limit of 10 bytes" in msg


def test_a_file_that_grew_past_the_limit_before_packing_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "FILES_MAX_BYTES", 10)
    (tmp_path / "a").write_bytes(b"x" * 10)
    carried = job.collect_files([str(tmp_path / "a")])
    (tmp_path / "a").write_bytes(b"x" * 11)
    with pytest.raises(TestbedError, match="more than the limit of 10 bytes") as exc:
        _archive(carried)
    assert exc.value.status == 2


# -- the command line ----------------------------------------------------------------------

def parse(*argv):
    return cli.parse_args(list(argv), {})


def test_run_file_is_repeatable_and_checked_at_parse_time(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("a")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.py").write_text("b")
    monkeypatch.chdir(tmp_path)
    args = parse("run", "--file", "a.py", "--file", str(tmp_path / "d"), "--", "true")
    assert args.files == ["a.py", str(tmp_path / "d")]
    assert [c.guest for c in args.carried] == [job.guest_path(str(tmp_path / p))
                                               for p in ("a.py", "d", "d/b.py")]
    assert parse("run", "--", "true").carried == []


@pytest.mark.parametrize("make, match", [
    (lambda d: None, "no such file or directory"),
    (lambda d: os.mkfifo(d / "x"), "is a FIFO"),
])
def test_run_file_errors_exit_2_naming_the_path(tmp_path, capsys, make, match):
    make(tmp_path)
    with pytest.raises(SystemExit) as exc:
        parse("run", "--file", str(tmp_path / "x"), "--", "true")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--file '{tmp_path}/x'" in err and match in err


def test_run_file_over_the_limit_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(job, "FILES_MAX_BYTES", 3)
    (tmp_path / "big").write_bytes(b"1234")
    with pytest.raises(SystemExit) as exc:
        parse("run", "--file", str(tmp_path / "big"), "--", "true")
    assert exc.value.code == 2
    assert "4 bytes" in capsys.readouterr().err


def test_file_is_an_option_of_run_only(tmp_path):
    (tmp_path / "a").write_text("a")
    with pytest.raises(SystemExit) as exc:
        parse("probe", "--file", str(tmp_path / "a"))
    assert exc.value.code == 2
    assert parse("probe").command == cli.PROBE_COMMAND


def test_run_help_documents_file(capsys):
    with pytest.raises(SystemExit) as exc:
        parse("run", "--help")
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--file PATH" in out and "/job/files" in out and "256 MiB" in out
    assert "nothing comes back to the host" in out
