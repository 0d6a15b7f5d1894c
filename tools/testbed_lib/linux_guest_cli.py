"""tools/linux-guest's command line: the nested Linux guest of one kernel, into a directory.

    tools/linux-guest [--kernel K] [--modules DIR] [--refresh] -o OUT
        the guest the testbed carries for --kernel K (as tools/testbed takes it: a Debian
        suite, a version, a path to an Image or a .deb), made in the testbed's cache
    tools/linux-guest --deb FILE [--deb FILE] [--busybox FILE] -o OUT
        from a linux-image .deb (and, for Debian's 7.x, its linux-binary .deb)
    tools/linux-guest --image FILE --modules DIR [--busybox FILE] -o OUT
        from an Image and its lib/modules/<release> tree

OUT gets Image, initramfs.cpio and release (see linux_guest.py); point KVMITS_LINUX_GUEST at
it on an arm64 KVM host. Exit status 0, 1 when this kernel cannot have a guest (the reason
is printed), 2 for a bad command line, 125 when the testbed's cache could not be built.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import build, host, kernels, linux_guest, log
from .apt import read_member, vmlinuz_member
from .errors import EXIT_TESTBED, TestbedError
from .image import read_stamp
from .log import info
from .paths import Layout, cache_root

EXIT_NO_GUEST = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/linux-guest",
        description="Makes the nested Linux guest kvmits boots to test its virtio devices: the "
                    "kernel's Image, an initramfs with busybox, the virtio-pci/blk/rng modules "
                    "and an /init that runs /job.sh, and the kernel release. From Debian "
                    "packages only. tools/testbed carries one into every run at "
                    f"/{linux_guest.GUEST_DIR}.",
        epilog="exit status: 0; 1 when the kernel cannot have a guest (said why); 2 for a bad "
               "command line; 125 when the testbed's cache could not be made.")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="directory to write Image, initramfs.cpio and release into")
    p.add_argument("--kernel", metavar="K",
                   help="as tools/testbed's --kernel (default: the testbed's default kernel)")
    p.add_argument("--modules", metavar="DIR",
                   help="with --kernel PATH or --image: the lib/modules/<release> tree")
    p.add_argument("--refresh", action="store_true", help="with --kernel: update the package lists first")
    p.add_argument("--deb", action="append", default=[], metavar="FILE",
                   help="a linux-image .deb (repeat for its linux-binary .deb)")
    p.add_argument("--image", metavar="FILE", help="an arm64 Image (or Image.gz, EFI zboot)")
    p.add_argument("--busybox", metavar="FILE",
                   help="with --deb or --image: a busybox-static .deb (default: the testbed cache's)")
    return p


def _cached_busybox(layout: Layout) -> Path:
    stamp = read_stamp(layout) or {}
    entry = next((e for e in stamp.get("guest_packages", ()) if e.startswith("busybox-static=")), None)
    deb = layout.archives / kernels.stamp_deb(entry).filename if entry else None
    if deb is None or not deb.is_file():
        raise TestbedError("no busybox-static .deb in the testbed cache: give --busybox FILE, or run "
                           "tools/testbed build first")
    return deb


def _from_files(args, layout: Layout) -> linux_guest.Guest:
    busybox = Path(args.busybox) if args.busybox else _cached_busybox(layout)
    if args.deb:
        debs = [Path(d) for d in args.deb]
        image = next((found for d in debs if (found := read_member(d, vmlinuz_member))), None)
        if image is None:
            raise linux_guest.GuestBuildError(f"no ./boot/vmlinuz-* or ./usr/lib/modules/*/vmlinuz in "
                                              f"{', '.join(args.deb)}")
        modules = linux_guest.deb_modules(debs, Path(tempfile.gettempdir()))
        kernel = image[1]
    else:
        release, tree = kernels.modules_tree(args.modules)
        modules = contextlib.nullcontext(linux_guest.ModuleTree.scan(tree, release))
        kernel = Path(args.image).read_bytes()
    with modules as tree:
        return linux_guest.make_guest(kernel, tree, linux_guest.read_busybox(busybox))


def _from_testbed(spec: kernels.KernelSpec, args, layout: Layout) -> linux_guest.Cached:
    host.ensure_programs(host.DEBIAN_TOOLS, "making the nested Linux guest")
    with build.locked(layout):
        stamp = build.ensure_image(layout, refresh=args.refresh)
        kernel = kernels.ensure_kernel(layout, spec, stamp, refresh=args.refresh)
    if kernel.guest is None or kernel.guest.directory is None:
        raise linux_guest.GuestBuildError(kernel.guest.note if kernel.guest else "no guest")
    info(f"kernel {kernel.description}")
    return kernel.guest


def main(argv: list[str] | None = None) -> int:
    saved, log.PREFIX = log.PREFIX, "linux-guest"
    try:
        return _main(argv)
    finally:
        log.PREFIX = saved


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if (args.deb or args.image) and (args.kernel or args.refresh):
        parser.error("--kernel/--refresh go through the testbed's cache; --deb and --image do not: choose one")
    if args.deb and args.image:
        parser.error("--deb or --image, not both")
    if args.image and not args.modules:
        parser.error("--image needs --modules DIR (the modules the guest loads)")
    if args.deb and args.modules:
        parser.error("--modules goes with --image or --kernel PATH; a .deb has its own")
    for path in [*args.deb, args.image, args.busybox, args.modules]:
        if path and not os.path.exists(path):
            parser.error(f"no such file or directory: {path}")
    spec = None
    if not (args.deb or args.image):
        try:
            spec = (kernels.parse_spec(args.kernel, args.modules) if args.kernel else kernels.DEFAULT
                    if not args.modules else kernels.parse_spec(kernels.DEFAULT_SUITE, args.modules))
        except ValueError as exc:   # a --kernel that names nothing
            parser.error(str(exc))
    layout = Layout(cache_root())
    out = Path(args.out)
    try:
        if args.deb or args.image:
            guest = _from_files(args, layout)
            linux_guest.write_guest_dir(guest, out)
            note = guest.describe()
        else:
            cached = _from_testbed(spec, args, layout)
            out.mkdir(parents=True, exist_ok=True)
            for name in linux_guest.FILES:
                shutil.copyfile(cached.directory / name, out / name)
            note = cached.note
    except linux_guest.GuestBuildError as exc:
        info(f"error: no guest: {exc}")
        return EXIT_NO_GUEST
    except TestbedError as exc:
        info(f"error: {exc}")
        return exc.status or EXIT_TESTBED
    info(f"nested Linux guest {note}: {', '.join(linux_guest.FILES)} in {out}")
    return 0
