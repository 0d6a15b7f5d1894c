"""The job: a copy of the source tree and the command to run in it, as a newc archive that is
appended to the base image for one run.

In the guest, the source tree is at /job/src (the command's working directory and on
PYTHONPATH) and /job/run is a shell script that runs the command there. Files and
directories given with `tools/testbed run --file PATH` are at guest_path(PATH), under
/job/files (FILES_DIR).
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import host, newc
from .errors import EXIT_USAGE, TestbedError
from .image import JOB_DIR
from .log import clock, info, since

SRC_DIR = f"{JOB_DIR}/src"
# Where `run --file PATH` puts PATH in the guest: FILES_DIR + PATH's absolute host path. The
# rule has one definition, in kvmits (kvmits.cli.testbed.guest_path), where `kvmits run` and
# `kvmits test` name the carried files in the commands they hand to the testbed; it imports
# only the standard library, and `from . import newc` above has put this source tree on sys.path.
from kvmits.cli.testbed import FILES_DIR, guest_path  # noqa: E402

assert FILES_DIR.startswith(JOB_DIR + "/"), FILES_DIR
# The most --file may carry (the sum of the regular files' sizes): the job archive is
# unpacked into the guest's RAM (2048 MiB by default), next to the base image.
FILES_MAX_BYTES = 256 << 20
# What of the source tree the guest gets: tracked and untracked-but-not-ignored files under
# these paths, as git sees them, so the guest runs exactly what the developer is editing.
JOB_PATHS = ("kvmits", "include", "tests", "tools", "benchmarks", "examples", "pyproject.toml")
# Built arm64 guest programs (ignored by git, made by `make -C guests`).
GUEST_BUILD = "guests/build"
# Skipped when the tree is not a git work tree and is walked instead.
WALK_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", ".git", ".mypy_cache", ".ruff_cache"}
WALK_SKIP_SUFFIXES = (".pyc", ".pyo")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_ls_files(output: bytes) -> list[str]:
    """Paths from `git ls-files -z` output."""
    return [p.decode("utf-8", "surrogateescape") for p in output.split(b"\0") if p]


def git_files(root: Path) -> list[str] | None:
    """Tracked + untracked-not-ignored files under JOB_PATHS, or None if root is not a git
    work tree (or there is no git): then the tree is walked instead."""
    try:
        proc = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                               "--exclude-standard", "--", *JOB_PATHS],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None
    if proc.returncode != 0:
        return None
    return parse_ls_files(proc.stdout)


def walk_files(root: Path, paths: tuple[str, ...] | list[str]) -> list[str]:
    """Files under paths (relative to root), leaving out caches and byte-code."""
    found = []
    for top in paths:
        start = root / top
        if start.is_file() or start.is_symlink() and not start.is_dir():
            found.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if d not in WALK_SKIP_DIRS)
            rel = Path(dirpath).relative_to(root)
            for name in filenames:
                if not name.endswith(WALK_SKIP_SUFFIXES):
                    found.append((rel / name).as_posix())
    return found


def select_files(root: Path) -> list[str]:
    """The files of the job's source copy, relative to root, sorted, each one packable
    (a regular file or a symlink; files deleted but still in git's index are left out)."""
    listed = git_files(root)
    if listed is None:
        listed = walk_files(root, JOB_PATHS)
    listed += walk_files(root, [GUEST_BUILD]) if (root / GUEST_BUILD).is_dir() else []
    listed += walk_files(root, ["benchmarks/c/build"]) if (root / "benchmarks/c/build").is_dir() else []  # kvmits bench's C floor (make -C benchmarks/c)
    keep = set()
    for rel in listed:
        p = root / rel
        if p.is_symlink() or p.is_file():
            keep.add(rel)
    return sorted(keep)


def make_guests(root: Path) -> None:
    """Builds the arm64 guest programs, when the tree has a guests/Makefile."""
    if not (root / "guests" / "Makefile").exists():
        return
    host.ensure_programs(host.GUEST_BUILD, "building the arm64 guest programs (make -C guests)")
    t = clock()
    # make's output goes to stderr: stdout carries only the guest's console.
    proc = subprocess.run(["make", "-C", str(root / "guests")], stdout=sys.stderr,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise TestbedError(f"'make -C guests' failed with status {proc.returncode}: the arm64 "
                           "guest programs did not build, so nothing was run (see make's output "
                           "above; --no-make skips this step)")
    info(f"make -C guests: ok ({since(t):.1f}s)")


def parse_env(assignments: list[str]) -> dict[str, str]:
    env = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def run_script(argv: list[str], env: dict[str, str], src: str = SRC_DIR) -> str:
    """/job/run: the command, quoted for the guest's POSIX shell, run in the source copy."""
    if not argv:
        raise ValueError("no command to run")
    lines = ["#!/bin/sh",
             "# The command of one tools/testbed run, started by the guest's /init.",
             f"cd {shlex.quote(src)} || exit 125",
             f"export PYTHONPATH={shlex.quote(src)}"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CarriedFile:
    """One entry of the --file payload: a regular file or a directory."""
    host: str    # absolute, normalised host path, the one read
    guest: str   # guest_path(host)
    is_dir: bool
    mode: int    # permission bits (stat.S_IMODE), kept in the guest
    size: int    # bytes, 0 for a directory
    mtime: int


def _file_error(arg: str, host: str, why: str) -> TestbedError:
    where = repr(arg) if arg == host else f"{arg!r} ({host})"
    return TestbedError(f"--file {where}: {why}", EXIT_USAGE)


def _check_name(arg: str, host: str) -> None:
    try:
        host.encode("utf-8")
    except UnicodeEncodeError:
        raise _file_error(arg, host, "the name is not valid UTF-8, which the job archive "
                                     "needs") from None


def _open_regular(path: str):
    """path opened for reading, refused unless it is a regular file; O_NONBLOCK so that a FIFO
    put in its place since it was looked at cannot hang us."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise OSError(errno.EINVAL, "no longer a regular file")
    return f


def _check_readable(arg: str, host: str, is_dir: bool) -> None:
    """os.access first, then really opening it (root passes os.access for everything)."""
    if not os.access(host, os.R_OK | (os.X_OK if is_dir else 0)):
        raise _file_error(arg, host, "not readable (permission denied)")
    try:
        if is_dir:
            with os.scandir(host):
                pass
        else:
            with _open_regular(host):
                pass
    except OSError as exc:
        raise _file_error(arg, host, f"cannot be read: {exc.strerror or exc}") from None


def _kind(mode: int) -> str:
    return {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symlink"}.get(stat.S_IFMT(mode),
                                                                         "not a regular file")


def _entry(host: str, st: os.stat_result, is_dir: bool) -> CarriedFile:
    return CarriedFile(host, guest_path(host), is_dir, stat.S_IMODE(st.st_mode),
                       0 if is_dir else st.st_size, int(st.st_mtime))


def _walk(arg: str, top: str, found: dict[str, CarriedFile]) -> None:
    """The tree under the directory top, parents first. Symlinks inside it, and anything
    neither a regular file nor a directory, are skipped with a warning."""
    try:
        with os.scandir(top) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise _file_error(arg, top, f"cannot be listed: {exc.strerror or exc}") from None
    for e in entries:
        host = posixpath.join(top, e.name)
        try:
            st = e.stat(follow_symlinks=False)
        except OSError as exc:
            raise _file_error(arg, host, f"cannot be read: {exc.strerror or exc}") from None
        if stat.S_ISLNK(st.st_mode):
            info(f"--file {arg!r}: skipping symlink {host} (only a --file PATH itself is "
                 "followed; give the target as its own --file to carry it)")
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            info(f"--file {arg!r}: skipping {host}: {_kind(st.st_mode)}, neither a regular file "
                 "nor a directory")
            continue
        _check_name(arg, host)
        is_dir = stat.S_ISDIR(st.st_mode)
        _check_readable(arg, host, is_dir)
        found[host] = _entry(host, st, is_dir)
        if is_dir:
            _walk(arg, host, found)


def collect_files(paths: list[str], cwd: str | None = None,
                  limit: int | None = None) -> list[CarriedFile]:
    """What `run --file PATH...` carries, checked before anything boots: each PATH made
    absolute against cwd (default: the working directory) and normalised as guest_path()
    does; a symlink given as PATH is followed, a directory is taken recursively (symlinks and
    special files inside it skipped with a warning). Raises TestbedError with status 2
    (EXIT_USAGE) naming the path when one does not exist, cannot be read, or is neither a
    regular file nor a directory, and when the regular files' sizes add up to more than
    limit (default FILES_MAX_BYTES). The entries come sorted by guest path, each once
    (overlapping PATHs are fine)."""
    cwd = os.getcwd() if cwd is None else cwd
    limit = FILES_MAX_BYTES if limit is None else limit
    found: dict[str, CarriedFile] = {}
    for arg in paths:
        arg = os.fspath(arg)
        host = posixpath.normpath(posixpath.join(cwd, arg))
        _check_name(arg, host)
        try:
            st = os.stat(host)  # follows a symlink given as PATH
        except FileNotFoundError:
            raise _file_error(arg, host, "no such file or directory") from None
        except OSError as exc:
            raise _file_error(arg, host, f"cannot be read: {exc.strerror or exc}") from None
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise _file_error(arg, host, f"is {_kind(st.st_mode)}, neither a regular file nor a "
                                         "directory")
        is_dir = stat.S_ISDIR(st.st_mode)
        _check_readable(arg, host, is_dir)
        found[host] = _entry(host, st, is_dir)
        if is_dir:
            _walk(arg, host, found)
    total = sum(c.size for c in found.values())
    if total > limit:
        raise TestbedError(f"--file: the files come to {_size(total)}, more than the limit of "
                           f"{_size(limit)} (the job archive is held in the guest's RAM)",
                           EXIT_USAGE)
    return sorted(found.values(), key=lambda c: c.guest)


def _size(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):.1f} MiB)"


def payload_bytes(carried: list[CarriedFile]) -> int:
    return sum(c.size for c in carried)


def _write_carried(w: newc.NewcWriter, carried: list[CarriedFile], limit: int) -> None:
    """The --file entries under FILES_DIR: every directory above them (0755 unless carried
    itself), parents first, then the regular files, read now."""
    dirs = {c.guest.lstrip("/"): c.mode for c in carried if c.is_dir}
    files = [c for c in carried if not c.is_dir]
    names = [c.guest.lstrip("/") for c in carried]
    job = JOB_DIR.lstrip("/")
    all_dirs = set(newc.parent_dirs(names)) | set(dirs)
    all_dirs.discard(job)  # written first by write_job
    for d in sorted(all_dirs, key=lambda d: (d.count("/"), d)):
        w.add_dir(d, dirs.get(d, 0o755))
    total = 0
    for c in files:
        try:
            with _open_regular(c.host) as f:
                data = f.read()
        except OSError as exc:
            raise TestbedError(f"--file: cannot read {c.host}: {exc.strerror or exc}",
                               EXIT_USAGE) from None
        total += len(data)
        if total > limit:  # a file grew since collect_files
            raise TestbedError(f"--file: the files now come to more than the limit of "
                               f"{_size(limit)} ({c.host} grew)", EXIT_USAGE)
        w.add_file(c.guest.lstrip("/"), data, c.mode, c.mtime)


def write_job(out: BinaryIO, root: Path, files: list[str], script: str,
              carried: list[CarriedFile] = (), limit: int | None = None) -> None:
    """Appends the job archive (one newc archive) to out: /job/run, the source copy under
    SRC_DIR and the --file entries (collect_files) under FILES_DIR. A --file that cannot be
    read now is a TestbedError with status 2."""
    w = newc.NewcWriter(out)
    job = JOB_DIR.lstrip("/")
    src = SRC_DIR.lstrip("/")
    w.add_dir(job)
    w.add_file(f"{job}/run", script.encode(), 0o755)
    w.add_dir(src)
    for d in newc.parent_dirs(files):
        w.add_dir(f"{src}/{d}", 0o755)
    for rel in files:
        w.add_path(f"{src}/{rel}", root / rel)
    if carried:
        _write_carried(w, list(carried), FILES_MAX_BYTES if limit is None else limit)
    w.close()
