"""kvmits' pure-Python run-time dependencies from PyPI, for the guest.

The guest has Debian's python3 and python3-cffi but no pip and no network, so every other
run-time dependency listed in pyproject.toml (`fdt` today) is fetched on the host as a
wheel and unpacked into a directory of the image that the guest's Python puts on sys.path.
Only pure-Python wheels are accepted: the guest has no compiler, and its CPU is arm64.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

from .errors import TestbedError
from .log import info

# Provided by Debian inside the guest (python3-cffi), never by a wheel.
FROM_DEBIAN = {"cffi"}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    m = _NAME.match(requirement)
    if not m:
        raise TestbedError(f"cannot read a project name from requirement {requirement!r}")
    return normalize(m.group(1))


def guest_requirements(pyproject: Path) -> list[str]:
    """The [project] dependencies the guest must get from PyPI, as written (sorted)."""
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TestbedError(f"cannot read the dependencies in {pyproject}: {exc}") from exc
    deps = data.get("project", {}).get("dependencies", [])
    return sorted(d.strip() for d in deps if requirement_name(d) not in FROM_DEBIAN)


def requirements_key(requirements: list[str], python_version: str) -> str:
    text = "\n".join([f"python {python_version}", *requirements])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pip_download_command(pip: list[str], requirements: list[str], dest: Path,
                         python_version: str) -> list[str]:
    """`pip download` restricted to pure-Python wheels (tag py3-none-any and the like) for
    the guest's Python version, whatever the host's interpreter and architecture."""
    return [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--python-version", python_version, "--implementation", "py", "--abi", "none",
            "--platform", "any", "-d", str(dest), *requirements]


def fetch_wheels(pip: Callable[[], list[str]], requirements: list[str], wheels_root: Path,
                 python_version: str, refresh: bool = False) -> list[Path]:
    """Downloads the wheels once per (requirements, Python version); `refresh` asks PyPI again
    (newer releases within the same requirements). `pip` gives the pip command, and is only
    called when something is to be downloaded."""
    if not requirements:
        return []
    dest = wheels_root / requirements_key(requirements, python_version)
    done = dest / ".complete"
    if refresh or not done.exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        info(f"pip download (pure-Python wheels for the guest): {' '.join(requirements)}")
        cmd = pip_download_command(pip(), requirements, dest, python_version)
        proc = subprocess.run(cmd, stdout=sys.stderr, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise TestbedError(f"pip download of {' '.join(requirements)} failed (status "
                               f"{proc.returncode}); the guest accepts pure-Python wheels only")
        done.write_text("\n".join(requirements) + "\n")
    wheels = sorted(dest.glob("*.whl"))
    got = {requirement_name(w.name.split("-")[0]) for w in wheels}
    lacking = [r for r in requirements if requirement_name(r) not in got]
    if lacking:
        raise TestbedError(f"no wheel downloaded for {lacking} in {dest}")
    return wheels


def unpack_wheels(wheels: list[Path], target: Path) -> None:
    """Unpacks wheels the way an installer would for pure-Python ones: purelib at the top."""
    target.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.infolist():
                if member.filename.split("/", 1)[0].endswith(".data"):
                    raise TestbedError(f"{wheel.name} has a .data directory: not a plain pure-Python wheel")
            zf.extractall(target)
