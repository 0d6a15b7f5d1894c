"""Host side prerequisites: the few Debian packages the testbed needs on the x86_64 host.

Only Debian's archive is used. A missing program is installed with apt-get (after
`apt-get update`, since a fresh machine may have no package lists); when that is not
possible the testbed refuses with a message that says what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .errors import TestbedError
from .log import info

# program -> Debian package providing it
QEMU = {"qemu-system-aarch64": "qemu-system-arm"}
DEBIAN_TOOLS = {"dpkg-deb": "dpkg", "apt-get": "apt", "apt-cache": "apt"}
GUEST_BUILD = {"make": "make", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}

# apt-get waits this long for another apt/dpkg on the host instead of failing at once.
APT_LOCK_TIMEOUT = 300


def missing_packages(programs: dict[str, str], which=shutil.which) -> list[str]:
    """Debian packages to install so that every program in `programs` is on PATH."""
    need: list[str] = []
    for program, package in programs.items():
        if which(program) is None and package not in need:
            need.append(package)
    return need


def apt_install(packages: list[str], why: str) -> None:
    """Installs host packages from Debian's archive, or raises TestbedError saying why not."""
    if not packages:
        return
    pkgs = " ".join(packages)
    if shutil.which("apt-get") is None:
        raise TestbedError(f"{why} needs the Debian packages {pkgs}, and this host has no apt-get: "
                           "the testbed supports Debian 12 (or a derivative) hosts only")
    if os.geteuid() != 0:
        raise TestbedError(f"{why} needs the Debian packages {pkgs}: run as root, or "
                           f"'apt-get install {pkgs}' first")
    info(f"installing host packages: {pkgs} ({why})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT}"]
    steps = [["apt-get", *lock, "-q", "update"],
             ["apt-get", *lock, "-q", "install", "-y", "--no-install-recommends", *packages]]
    for cmd in steps:
        # apt's progress goes to stderr so that stdout stays the guest's console.
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise TestbedError(f"'{' '.join(cmd)}' failed with status {proc.returncode}; "
                               f"{why} cannot go on without {pkgs}")


def ensure_programs(programs: dict[str, str], why: str) -> None:
    apt_install(missing_packages(programs), why)
    still = [p for p in programs if shutil.which(p) is None]
    if still:
        raise TestbedError(f"{why}: {', '.join(still)} still not found after installing "
                           f"{', '.join(sorted(set(programs[p] for p in still)))}")


def python_for(version: str) -> str | None:
    """A host interpreter of the given minor version ("3.11"), for byte-compiling guest Python:
    bytecode is architecture independent but specific to the minor version."""
    if "%d.%d" % sys.version_info[:2] == version:
        return sys.executable
    found = shutil.which(f"python{version}")
    if found:
        return found
    try:
        apt_install([f"python{version}-minimal"], f"byte-compiling the guest's Python {version}")
    except TestbedError as exc:
        info(f"warning: {exc}; the guest will compile its Python modules at import (slower)")
        return None
    return shutil.which(f"python{version}")


def pip_command() -> list[str]:
    """A pip that can `download` wheels: the running interpreter's, else Debian's python3-pip."""
    for python in (sys.executable, "/usr/bin/python3"):
        if python and os.path.exists(python):
            probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True)
            if probe.returncode == 0:
                return [python, "-m", "pip"]
    apt_install(["python3-pip"], "fetching the pure-Python wheels kvmits needs in the guest")
    return ["/usr/bin/python3", "-m", "pip"]
