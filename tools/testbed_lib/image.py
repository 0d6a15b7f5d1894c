"""The guest image: Debian's arm64 kernel and a base initramfs, and the stamp saying what
they were made from.

The base initramfs is the root file system the guest runs in (it is never switched away
from): the unpacked closure of GUEST_PACKAGES, the pure-Python wheels, byte-code compiled
on the host, and /init, the busybox shell script below. Each run appends a small job
archive to it (see job.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

from . import newc
from .apt import Deb, extract, extract_kernel
from .console import EXIT, START
from .errors import TestbedError
from .log import clock, info, since
from .paths import Layout

# Bump when the image changes in a way the stamp's other fields cannot see.
FORMAT = 1

JOB_DIR = "/job"
# Wheels are unpacked here; a .pth file in Debian's dist-packages puts it on sys.path for
# every python3 in the guest (a subprocess, `python3 -I`, pytest's own imports).
DEPS_DIR = "opt/kvmits/deps"
DEPS_PTH = "usr/lib/python3/dist-packages/kvmits-testbed-deps.pth"

# What a test run never needs (about a third of the unpacked packages).
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
        "usr/share/lintian", "usr/lib/aarch64-linux-gnu/gconv")
TRIM_PYTHON = ("test", "idlelib", "ensurepip", "pydoc_data", "tkinter", "turtledemo", "lib2to3")

# Small files a C library and Python expect (getpass, localhost), absent without base-files.
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    "etc/hostname": "kvmits-testbed\n",
}


def init_script() -> str:
    """PID 1 of the guest. It runs /job/run (written per run by job.py) with its output on
    the console, between the START and EXIT markers the host looks for, then powers off."""
    return f"""#!/bin/busybox sh
# PID 1 of the kvmits arm64 testbed guest, written by tools/testbed (testbed_lib/image.py).
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb PYTHONUNBUFFERED=1 KVMITS_TESTBED=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t devpts devpts /dev/pts
# POSIX semaphores (multiprocessing) live in /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname -F /etc/hostname
ip link set lo up
token=none
for arg in $(cat /proc/cmdline); do
    case "$arg" in kvmits.token=*) token="${{arg#kvmits.token=}}" ;; esac
done
echo "{START} $token uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ -x {JOB_DIR}/run ]; then
    # stdin from /dev/null: the console has no one typing, a read would hang until the time limit
    {JOB_DIR}/run </dev/null
    rc=$?
else
    echo "testbed: no {JOB_DIR}/run in the initramfs"
    rc=125
fi
echo "{EXIT} $token $rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
"""


def guest_python_version(closure: list[Deb]) -> str:
    """'3.11' from the python3.X package in the closure."""
    versions = sorted({m.group(1) for d in closure if (m := re.fullmatch(r"python(3\.\d+)", d.name))})
    if len(versions) != 1:
        raise TestbedError(f"cannot tell the guest's Python version from its packages: {versions}")
    return versions[0]


def make_stamp(guest: list[Deb], kernel: Deb, wheels: list[str], bytecode: str | None) -> dict:
    """Everything the image is made from. A different stamp means a rebuild."""
    return {
        "format": FORMAT,
        "kernel": str(kernel),
        "guest_packages": sorted(str(d) for d in guest),
        "wheels": sorted(wheels),
        "init_sha256": hashlib.sha256(init_script().encode()).hexdigest(),
        "bytecode": bytecode,
    }


def read_stamp(layout: Layout) -> dict | None:
    try:
        return json.loads(layout.image_stamp.read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_current(layout: Layout, stamp: dict) -> bool:
    return (read_stamp(layout) == stamp and layout.kernel.is_file()
            and layout.base_cpio.is_file())


def stamp_changes(old: dict | None, new: dict) -> list[str]:
    """Which inputs differ, for the log line that says why the image is rebuilt."""
    if old is None:
        return ["no image yet"]
    return [k for k in new if old.get(k) != new.get(k)]


def build_rootfs(rootfs: Path, archives: Path, guest: list[Deb], wheels: list[Path],
                 compiler: str | None, python_version: str) -> None:
    from .pydeps import unpack_wheels

    t = clock()
    for deb in guest:
        extract(archives / deb.filename, rootfs)
    for rel in TRIM:
        shutil.rmtree(rootfs / rel, ignore_errors=True)
    for rel in TRIM_PYTHON:
        shutil.rmtree(rootfs / f"usr/lib/python{python_version}" / rel, ignore_errors=True)
    unpack_wheels(wheels, rootfs / DEPS_DIR)
    (rootfs / DEPS_PTH).parent.mkdir(parents=True, exist_ok=True)
    (rootfs / DEPS_PTH).write_text(f"/{DEPS_DIR}\n")
    for rel, text in ETC_FILES.items():
        (rootfs / rel).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / rel).write_text(text)
    for d in ("dev", "proc", "sys", "tmp", "run", "root", JOB_DIR.lstrip("/")):
        (rootfs / d).mkdir(exist_ok=True)
    init = rootfs / "init"
    init.write_text(init_script())
    init.chmod(0o755)
    info(f"unpacked {len(guest)} arm64 packages and {len(wheels)} wheels ({since(t):.1f}s)")
    if compiler:
        t = clock()
        # Byte-code is architecture independent: compiling here saves the (emulated, ~10x
        # slower) guest from compiling the standard library at every boot. unchecked-hash
        # .pyc files are used without comparing the source's mtime.
        dirs = [rootfs / f"usr/lib/python{python_version}", rootfs / "usr/lib/python3/dist-packages",
                rootfs / DEPS_DIR]
        proc = subprocess.run([compiler, "-m", "compileall", "-q", "-j", "0",
                               "--invalidation-mode", "unchecked-hash", "-s", str(rootfs), "-p", "/",
                               *(str(d) for d in dirs if d.is_dir())],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            # Debian ships a few files meant for other Python versions; the rest is compiled.
            info(f"compileall reported errors (those modules compile in the guest): "
                 f"{proc.stdout.strip().splitlines()[-1:]}")
        info(f"byte-compiled the guest's Python with {compiler} ({since(t):.1f}s)")


def pack_rootfs(rootfs: Path, out: Path) -> int:
    with open(out, "wb") as f:
        w = newc.NewcWriter(f)
        count = w.add_tree(rootfs)
        # The kernel opens /dev/console for PID 1 before anything is mounted.
        w.add_chardev("dev/console", 5, 1)
        w.close()
    return count + 1


def build_image(layout: Layout, guest: list[Deb], kernel: Deb, wheels: list[Path],
                compiler: str | None, python_version: str, stamp: dict) -> None:
    """Makes image/ from scratch in a side directory, then swaps it in."""
    t0 = clock()
    work = layout.root / "build"
    new = layout.root / "image.new"
    for d in (work, new):
        shutil.rmtree(d, ignore_errors=True)
    new.mkdir(parents=True)
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True)
    kname = extract_kernel(layout.archives / kernel.filename, new / "vmlinuz")
    info(f"kernel {kname} from {kernel}")
    build_rootfs(rootfs, layout.archives, guest, wheels, compiler, python_version)
    count = pack_rootfs(rootfs, new / "base.cpio")
    (new / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")
    old = layout.root / "image.old"
    shutil.rmtree(old, ignore_errors=True)
    if layout.image.exists():
        layout.image.rename(old)
    new.rename(layout.image)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    size = layout.base_cpio.stat().st_size
    info(f"image built: base.cpio {size / 2**20:.0f} MiB, {count} entries ({since(t0):.1f}s)")
