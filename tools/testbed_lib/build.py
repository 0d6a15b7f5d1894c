"""Making sure the cached image matches its inputs, and rebuilding it when it does not.

Inputs: the package closure (guest packages and the kernel, as the arm64 package lists
resolve them), the init script, and the wheel list. On the cached path nothing here talks
to apt or pip: closures are remembered per package-lists version, wheels per requirement
list, and lists are refreshed once a day (or with --refresh).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path

from . import host
from .apt import GUEST_PACKAGES, KERNEL_METAPACKAGE, PrivateApt, Resolver, kernel_image, lists_fresh
from .errors import TestbedError
from .image import build_image, guest_python_version, is_current, make_stamp, read_stamp, stamp_changes
from .log import clock, info, since
from .paths import SOURCE_ROOT, Layout
from .pydeps import fetch_wheels, guest_requirements


@contextlib.contextmanager
def locked(layout: Layout):
    """One process at a time builds the image or copies it into an initrd (several
    developers and CI jobs may share a cache)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info(f"waiting for another testbed using {layout.root}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_host() -> None:
    host.ensure_programs({**host.QEMU, **host.DEBIAN_TOOLS}, "the arm64 testbed")


def ensure_image(layout: Layout, refresh: bool = False, force: bool = False,
                 source_root: Path = SOURCE_ROOT) -> dict:
    """Returns the stamp of an image/ that matches today's inputs, building it if needed.
    Call with the lock held."""
    t0 = clock()
    apt = PrivateApt(layout.apt)
    apt.prepare()
    if refresh or not lists_fresh(apt.stamp, time.time()):
        try:
            apt.update()
        except TestbedError as exc:
            # No network, or the archive is down: an image we already have still works.
            if apt.stamp.exists() and layout.base_cpio.exists():
                info(f"warning: {exc}; going on with the package lists of an earlier update")
            else:
                raise
    resolver = Resolver(apt, layout.resolved)
    guest = resolver.closure(GUEST_PACKAGES)
    kernel = kernel_image(resolver.closure((KERNEL_METAPACKAGE,)))
    python_version = guest_python_version(guest)
    requirements = guest_requirements(source_root / "pyproject.toml")
    wheels = fetch_wheels(host.pip_command, requirements, layout.wheels, python_version, refresh)
    compiler = host.python_for(python_version)
    stamp = make_stamp(guest, kernel, [w.name for w in wheels], python_version if compiler else None)
    if not force and is_current(layout, stamp):
        return stamp
    why = ", ".join(stamp_changes(read_stamp(layout), stamp)) if not force else "--force"
    info(f"building the image ({why})")
    try:
        apt.download([*guest, kernel])
    except TestbedError as exc:
        if refresh:
            raise
        # The archive replaces a package version when it publishes an update; lists from
        # earlier today may name one that is gone. Ask again once.
        info(f"{exc}; updating the package lists and trying again")
        return ensure_image(layout, refresh=True, force=force, source_root=source_root)
    build_image(layout, guest, kernel, wheels, compiler, python_version, stamp)
    apt.prune([*guest, kernel])
    info(f"image ready ({since(t0):.1f}s)")
    return stamp
