"""kvmits.newc, the newc cpio writer of the testbed's initrds and of the nested Linux guest's."""

import io
import os
import stat
import sys
from pathlib import Path

import pytest

from kvmits import newc

from .tools.newc_reader import read_archives


def test_entries_round_trip_with_alignment_and_block_padding():
    buf = io.BytesIO()
    w = newc.NewcWriter(buf)
    w.add_dir("job", 0o755, mtime=5)
    w.add_file("job/run", b"#!/bin/sh\nexit 3\n", 0o755, mtime=7)
    w.add_file("job/odd", b"abc")  # 3 bytes: data padding
    w.add_symlink("job/link", "run")
    w.add_chardev("dev/console", 5, 1)
    w.close()
    blob = buf.getvalue()

    assert len(blob) % newc.BLOCK == 0
    [entries] = read_archives(blob)
    assert [e.name for e in entries] == ["job", "job/run", "job/odd", "job/link", "dev/console"]
    by = {e.name: e for e in entries}
    assert stat.S_ISDIR(by["job"].mode) and stat.S_IMODE(by["job"].mode) == 0o755
    assert by["job/run"].data == b"#!/bin/sh\nexit 3\n" and stat.S_IMODE(by["job/run"].mode) == 0o755
    assert by["job/run"].mtime == 7
    assert by["job/odd"].data == b"abc"
    assert stat.S_ISLNK(by["job/link"].mode) and by["job/link"].data == b"run"
    assert stat.S_ISCHR(by["dev/console"].mode) and by["dev/console"].rdev == (5, 1)
    assert all(e.uid == 0 and e.gid == 0 for e in entries)


def test_two_archives_concatenate_as_the_kernel_expects():
    buf = io.BytesIO()
    for name in ("base", "job"):
        w = newc.NewcWriter(buf)
        w.add_file(name, name.encode())
        w.close()
    archives = read_archives(buf.getvalue())
    assert [[e.name for e in a] for a in archives] == [["base"], ["job"]]
    # the second archive starts on a block boundary, as cpio(1) output would
    assert archives[1][0].offset % newc.BLOCK == 0


def test_inode_numbers_are_unique():
    buf = io.BytesIO()
    w = newc.NewcWriter(buf)
    for i in range(3):
        w.add_file(f"f{i}", b"x")
    w.close()
    blob = buf.getvalue()
    inos = [blob[e.offset + 6:e.offset + 14] for e in read_archives(blob)[0]]
    assert len(set(inos)) == 3


def test_add_tree_parents_first_sorted_links_not_followed(fs):
    fs.create_file("/r/b/z.py", contents="z")
    fs.create_file("/r/b/a.py", contents="a", st_mode=stat.S_IFREG | 0o600)
    fs.create_file("/r/top", contents="t")
    fs.create_dir("/r/a")
    fs.create_symlink("/r/link-to-b", "b")
    buf = io.BytesIO()
    w = newc.NewcWriter(buf)
    count = w.add_tree("/r", prefix="x/")
    w.close()
    [entries] = read_archives(buf.getvalue())
    names = [e.name for e in entries]
    assert count == len(names)
    assert names == ["x/a", "x/b", "x/link-to-b", "x/top", "x/b/a.py", "x/b/z.py"]
    by = {e.name: e for e in entries}
    assert stat.S_ISLNK(by["x/link-to-b"].mode) and by["x/link-to-b"].data == b"b"
    assert stat.S_IMODE(by["x/b/a.py"].mode) == 0o600
    for e in entries:
        parent = e.name.rsplit("/", 1)[0]
        if parent != "x":
            assert names.index(parent) < names.index(e.name)


def test_add_path_refuses_special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    w = newc.NewcWriter(io.BytesIO())
    with pytest.raises(ValueError, match="cannot pack"):
        w.add_path("fifo", fifo)


def test_parent_dirs_are_listed_once_parents_first():
    assert newc.parent_dirs(["a/b/c.py", "a/d.py", "e.py", "a/b/f/g"]) == ["a", "a/b", "a/b/f"]


def test_the_testbed_uses_this_writer_and_no_copy_of_it():
    tools = str(Path(__file__).resolve().parents[1] / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    from testbed_lib import newc as testbed_newc

    assert testbed_newc.NewcWriter is newc.NewcWriter
    assert testbed_newc.parent_dirs is newc.parent_dirs
