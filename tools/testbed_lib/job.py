"""The job: a copy of the source tree and the command to run in it, as a newc archive that is
appended to the base image for one run.

In the guest, the source tree is at /job/src (the command's working directory and on
PYTHONPATH) and /job/run is a shell script that runs the command there.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

from . import host, newc
from .errors import TestbedError
from .image import JOB_DIR
from .log import clock, info, since

SRC_DIR = f"{JOB_DIR}/src"
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


def write_job(out: BinaryIO, root: Path, files: list[str], script: str) -> None:
    """Appends the job archive (one newc archive) to out."""
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
    w.close()
