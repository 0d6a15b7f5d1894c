"""The nested Linux guest: what kvmits boots inside the testbed to test its virtio devices.

For one kernel, a guest is three files (the contract kvmits.lab.linux_guest reads):

    Image            the kernel, as kvmits' loader takes it: an uncompressed arm64 Image
                     (Debian's vmlinuz already is one, EFI stub and all; a gzip'ed Image or an
                     EFI zboot image is decompressed here, on the host, once)
    initramfs.cpio   an uncompressed newc archive: busybox (Debian's busybox-static), the
                     kernel modules virtio-pci, virtio-blk and virtio-rng need (the dependency
                     closure from each module's .modinfo, less what modules.builtin lists),
                     and /init, the script below
    release          the kernel release the modules are for, one line

/init prints KVMITS-GUEST-INIT, mounts /proc, /sys and /dev, insmods the modules in dependency order (a line
"KVMITS-GUEST-INSMOD-FAILED <module>: <insmod's message>" per failure, and on), prints
KVMITS-GUEST-READY, runs `sh /job.sh` if there is one (its output on the console), prints
"KVMITS-GUEST-DONE rc=<status>" (rc=127 without a job), closes the console (which waits until
the UART has sent everything), syncs and powers off (PSCI SYSTEM_OFF).
A job is added as one more newc archive carrying /job.sh (kvmits.lab.linux_guest.LinuxGuest).

The testbed keeps each kernel's guest next to that kernel (image/linux-guest/ for the default,
kernels/<key>/linux-guest/ otherwise; the Image a hard link to the kernel's own when it needs
no conversion) with a stamp of its recipe, and appends it to every run's initrd at
/opt/kvmits/linux-guest/. When there can be none (a user Image without --modules, a kernel
without the virtio drivers) the run gets /opt/kvmits/linux-guest.missing saying why instead.
Standard library only, like the rest of tools/testbed_lib.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager

from . import newc
from .apt import extract, read_member
from .errors import TestbedError
from .log import clock, info, since

# The guest's contract -- where the testbed puts it (and the note that replaces it), its files,
# /init's console markers -- has one definition, kvmits.lab.linux_guest, which parses what this
# builds. It imports only kvmits.errors and kvmits.newc (standard library), and `from . import
# newc` above has put this source tree on sys.path.
from kvmits.lab.linux_guest import DONE, FILES, INIT, INSMOD_FAILED, READY  # noqa: E402
from kvmits.lab.linux_guest import TESTBED_DIR, TESTBED_MISSING  # noqa: E402

GUEST_DIR = TESTBED_DIR.lstrip("/")
MISSING_NOTE = TESTBED_MISSING.lstrip("/")
# The drivers the guest loads: virtio over PCI, its block device and its entropy source.
ROOT_MODULES = ("virtio_pci", "virtio_blk", "virtio_rng")
MODULES_DIR = "lib/modules"
# Bump when what a guest is made of changes in a way the recipe cannot see.
FORMAT = 1
STAMP = "stamp.json"

# arm64 Image header (Documentation/arch/arm64/booting.rst): "ARM\x64" at 0x38.
ARM64_MAGIC_OFFSET = 0x38
ARM64_MAGIC = b"ARMd"
# EFI zboot (drivers/firmware/efi/libstub/zboot-header.S): "MZ", "zimg" at 4, the payload's
# offset and size (le32) at 8 and 12, the compression's name (NUL-terminated) at 24.
ZBOOT_MAGIC = b"zimg"
_ZBOOT_HEADER = struct.Struct("<4s4sII8x32s")
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class GuestBuildError(TestbedError):
    """The guest cannot be made for this kernel (not a failure of the testbed's run)."""


def module_name(filename: str) -> str:
    """'virtio-rng.ko.xz' -> 'virtio_rng': the kernel's name for a module ('-' and '_' are
    the same to it; modinfo's depends= and modules.builtin use the file's spelling)."""
    base = os.path.basename(filename)
    for suffix in sorted(_MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base.replace("-", "_")


# --- the kernel ------------------------------------------------------------------------------

def _is_image(data: bytes) -> bool:
    return data[ARM64_MAGIC_OFFSET:ARM64_MAGIC_OFFSET + 4] == ARM64_MAGIC


def _decompress(data: bytes, method: str, what: str) -> bytes:
    try:
        if method == "gzip":
            # a gzip stream may be followed by padding or a size word: decompress the one stream
            return zlib.decompressobj(wbits=31).decompress(data)
        if method in ("xz", "lzma"):
            return lzma.LZMADecompressor().decompress(data)
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise GuestBuildError(f"{what}: its {method} data does not decompress: {exc}") from exc
    if method == "zstd":
        return _unzstd(data, what)
    raise GuestBuildError(f"{what}: compressed with {method!r}, which this tool cannot decompress "
                          "(gzip, xz, lzma and zstd can be)")


def _unzstd(data: bytes, what: str) -> bytes:
    # Python 3.11 has no zstd; Debian's zstd package has the program
    if shutil.which("zstd") is None:
        raise GuestBuildError(f"{what} is zstd-compressed, and this host has no zstd program "
                              "to decompress it (apt-get install zstd)")
    proc = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{what}: zstd -d failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def bootable_image(data: bytes, what: str = "the kernel") -> tuple[bytes, str]:
    """(an uncompressed arm64 Image, what data was) from an Image, a gzip'ed Image or an EFI
    zboot image (CONFIG_EFI_ZBOOT, whose payload is a compressed Image)."""
    if _is_image(data):
        return data, "Image"
    if data[:2] == b"\x1f\x8b":
        image, kind = _decompress(data, "gzip", what), "gzip'ed Image, decompressed"
    elif data[:2] == b"MZ" and data[4:8] == ZBOOT_MAGIC and len(data) >= _ZBOOT_HEADER.size:
        _mz, _zimg, offset, size, method = _ZBOOT_HEADER.unpack_from(data)
        method = method.split(b"\0", 1)[0].decode("ascii", "replace")
        if offset + size > len(data):
            raise GuestBuildError(f"{what}: EFI zboot header says the payload is at {offset:#x}, "
                                  f"{size:#x} bytes, beyond the file's {len(data):#x}")
        image = _decompress(data[offset:offset + size], method, what)
        kind = f"EFI zboot image ({method}), payload decompressed"
    else:
        raise GuestBuildError(f"{what}: not an arm64 Image (no 'ARM\\x64' at {ARM64_MAGIC_OFFSET:#x}), "
                              "not gzip, not EFI zboot")
    if not _is_image(image):
        raise GuestBuildError(f"{what}: the {kind.split(',')[0]} does not hold an arm64 Image")
    return image, kind


# --- modules ---------------------------------------------------------------------------------

def read_module(path: Path) -> bytes:
    """A module file's ELF bytes: .ko as it is, .ko.xz / .ko.gz / .ko.zst decompressed."""
    data = path.read_bytes()
    name = path.name
    for suffix, method in ((".ko.xz", "xz"), (".ko.gz", "gzip"), (".ko.zst", "zstd")):
        if name.endswith(suffix):
            return _decompress(data, method, str(path))
    return data


def modinfo(elf: bytes, what: str = "module") -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (key -> every value, in order)."""
    if elf[:4] != b"\x7fELF" or elf[4] not in (1, 2) or elf[5] not in (1, 2):
        raise GuestBuildError(f"{what}: not an ELF file")
    end = "<" if elf[5] == 1 else ">"
    try:
        if elf[4] == 2:  # ELFCLASS64
            shoff, = struct.unpack_from(end + "Q", elf, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x3A)
            section = struct.Struct(end + "II8x8xQQ")   # name, type, (flags, addr), offset, size
        else:            # ELFCLASS32
            shoff, = struct.unpack_from(end + "I", elf, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x2E)
            section = struct.Struct(end + "II4x4xII")
        headers = [section.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]
        _n, _t, stroff, strsize = headers[shstrndx]
        names = elf[stroff:stroff + strsize]
    except (struct.error, IndexError) as exc:
        raise GuestBuildError(f"{what}: truncated ELF section headers ({exc})") from exc
    for name_off, _type, offset, size in headers:
        if names[name_off:names.find(b"\0", name_off)] == b".modinfo":
            info_map: dict[str, list[str]] = {}
            for item in elf[offset:offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info_map.setdefault(key, []).append(value)
            return info_map
    raise GuestBuildError(f"{what}: no .modinfo section: not a kernel module")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    elf: bytes
    depends: tuple[str, ...]


@dataclass(frozen=True)
class ModuleTree:
    """A lib/modules/<release> directory: its module files by name, and what is built in."""
    root: Path
    release: str
    files: dict[str, Path]
    builtin: frozenset[str]

    @classmethod
    def scan(cls, root: Path, release: str | None = None) -> "ModuleTree":
        root = Path(root)
        if not root.is_dir():
            raise GuestBuildError(f"{root}: no such modules directory")
        files: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()   # build/ and source/ are symlinks: os.walk does not enter them
            for fn in sorted(filenames):
                if fn.endswith(_MODULE_SUFFIXES):
                    name = module_name(fn)
                    path = Path(dirpath) / fn
                    if name in files:
                        raise GuestBuildError(f"module {name} twice in {root}: {files[name]} and {path}")
                    files[name] = path
        try:
            text = (root / "modules.builtin").read_text()
        except FileNotFoundError:
            text = ""
        builtin = frozenset(module_name(line.strip()) for line in text.splitlines() if line.strip())
        return cls(root, release or root.name, files, builtin)

    def closure(self, roots=ROOT_MODULES) -> list[Module]:
        """The modules to load for roots, each after those it depends on (roots in the given
        order, each one's depends= in its order); built-in ones left out."""
        order: list[Module] = []
        state: dict[str, str] = {}

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in self.builtin or state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise GuestBuildError(f"modules depend on each other in a cycle: {' -> '.join(chain + (name,))}")
            path = self.files.get(name)
            if path is None:
                needed = f" (needed by {' <- '.join(reversed(chain))})" if chain else ""
                raise GuestBuildError(f"module {name}{needed}: neither in {self.root} nor in its "
                                      "modules.builtin: this kernel lacks the driver")
            elf = read_module(path)
            fields = modinfo(elf, str(path))
            vermagic = (fields.get("vermagic") or [""])[0]
            if vermagic and vermagic.split()[0] != self.release:
                raise GuestBuildError(f"{path} is built for kernel {vermagic.split()[0]}, not "
                                      f"{self.release}")
            depends = tuple(module_name(d) for d in ",".join(fields.get("depends", [])).split(",") if d)
            state[name] = "visiting"
            for dep in depends:
                visit(dep, chain + (name,))
            state[name] = "done"
            order.append(Module(name, path, elf, depends))

        for root in roots:
            visit(module_name(root), ())
        return order


# --- the initramfs ---------------------------------------------------------------------------

def init_script(modules: list[str] | tuple[str, ...]) -> str:
    """PID 1 of the nested guest (busybox sh). Every console character is a trap to the VMM:
    it prints only the markers, failures, and the job's own output."""
    names = " ".join(modules)
    return f"""#!/bin/busybox sh
# PID 1 of the kvmits nested Linux guest, made by tools/testbed_lib/linux_guest.py.
/bin/busybox echo {INIT}
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {names}; do
    out=$(insmod /{MODULES_DIR}/$m.ko 2>&1) || echo "{INSMOD_FAILED} $m: $out"
done
echo {READY}
if [ -f /job.sh ]; then
    sh /job.sh </dev/null
    rc=$?
else
    rc=127
fi
echo "{DONE} rc=$rc"
# Close the console before powering off: PID 1 holds the tty's last open, and its last close
# waits until the UART has sent what is queued (tty_port_close_start, up to closing_wait).
# Without it Linux 6.12 lost the last line after an idle spell in 2 of 40 runs (docs/kernels.md:
# our reading is the serial port's runtime PM, 500 ms autosuspend, deferring TX). A job that
# leaves a process holding the console keeps this close from being the last one.
exec </dev/null >/dev/null 2>&1
sync
poweroff -f
"""


def write_initramfs(out: BinaryIO, busybox: bytes, modules: list[Module]) -> None:
    """The guest's root file system, one newc archive: owner root, time 0 (the same inputs
    give the same bytes)."""
    w = newc.NewcWriter(out, mtime=0)
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "root", "lib", MODULES_DIR):
        w.add_dir(d)
    w.add_dir("tmp", 0o1777)
    # the kernel opens /dev/console for PID 1 before anything is mounted
    w.add_chardev("dev/console", 5, 1)
    w.add_file("bin/busybox", busybox, 0o755)
    for m in modules:
        w.add_file(f"{MODULES_DIR}/{m.name}.ko", m.elf)
    w.add_file("init", init_script([m.name for m in modules]).encode(), 0o755)
    w.close()


def _busybox_member(name: str) -> str | None:
    return "busybox" if re.fullmatch(r"(?:\./)?(?:usr/)?bin/busybox", name) else None


def read_busybox(deb: Path) -> bytes:
    """The busybox binary of a busybox(-static) .deb."""
    found = read_member(deb, _busybox_member)
    if found is None:
        raise GuestBuildError(f"no ./bin/busybox in {deb.name}")
    return found[1]


@dataclass(frozen=True)
class Guest:
    """A made guest, before it is written anywhere."""
    image: bytes
    image_kind: str           # what the kernel file was ("Image", "gzip'ed Image, decompressed", ...)
    initramfs: bytes
    release: str
    modules: tuple[str, ...]  # in load order

    def describe(self) -> str:
        mods = ", ".join(self.modules) if self.modules else "no modules (all built in)"
        return (f"{self.release}: Image {len(self.image) / 2**20:.1f} MiB, initramfs "
                f"{len(self.initramfs) / 2**20:.1f} MiB ({mods})")


def make_guest(image: bytes, tree: ModuleTree, busybox: bytes, roots=ROOT_MODULES) -> Guest:
    image, kind = bootable_image(image)
    modules = tree.closure(roots)
    buf = io.BytesIO()
    write_initramfs(buf, busybox, modules)
    return Guest(image, kind, buf.getvalue(), tree.release, tuple(m.name for m in modules))


def write_guest_dir(guest: Guest, out: Path, image_link: Path | None = None) -> None:
    """out/{Image,initramfs.cpio,release}; Image as a hard link to image_link when that file
    is the Image unchanged (saves a copy of 30-40 MB per kernel)."""
    out.mkdir(parents=True, exist_ok=True)
    image = out / "Image"
    image.unlink(missing_ok=True)
    linked = False
    if image_link is not None and guest.image_kind == "Image":
        with contextlib.suppress(OSError):
            os.link(image_link, image)
            linked = True
    if not linked:
        image.write_bytes(guest.image)
    (out / "initramfs.cpio").write_bytes(guest.initramfs)
    (out / "release").write_text(guest.release + "\n")


@contextlib.contextmanager
def deb_modules(debs: list[Path], workdir: Path):
    """Unpacks kernel .debs (a linux-image; for Debian's 7.x also its linux-base, linux-binary
    and linux-modules) into a scratch directory under workdir and yields the ModuleTree found
    there; removes it after."""
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="linux-guest-", dir=workdir) as tmp:
        for deb in debs:
            extract(deb, Path(tmp))
        trees = [p for sub in ("lib/modules", "usr/lib/modules") if (Path(tmp) / sub).is_dir()
                 for p in sorted((Path(tmp) / sub).iterdir()) if p.is_dir()]
        if len(trees) != 1:
            names = ", ".join(d.name for d in debs)
            raise GuestBuildError(f"{names}: expected the modules of one kernel release under "
                                  f"lib/modules or usr/lib/modules, found {[p.name for p in trees] or 'none'}")
        yield ModuleTree.scan(trees[0])


# --- in the testbed --------------------------------------------------------------------------

def recipe(kernel: str, busybox: str | None) -> dict:
    """What a cached guest was made from, besides the kernel's own files: a change rebuilds it."""
    return {"format": FORMAT, "kernel": kernel, "busybox": busybox, "roots": list(ROOT_MODULES),
            "init_sha256": hashlib.sha256(init_script(["MODULE"]).encode()).hexdigest()}


@dataclass(frozen=True)
class Cached:
    """A kernel's guest in the testbed cache: its directory, or why there is none."""
    directory: Path | None
    note: str      # Guest.describe(), or the reason there is no guest


def cached(directory: Path, want: dict) -> Cached | None:
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if stamp.get("recipe") != want:
        return None
    if stamp.get("missing"):
        return Cached(None, stamp["missing"])
    if not all((directory / f).is_file() for f in FILES):
        return None
    return Cached(directory, stamp["note"])


def ensure(directory: Path, vmlinuz: Path, kernel: str, busybox_deb: Path | None, busybox: str | None,
           modules: Callable[[], ContextManager[ModuleTree]]) -> Cached:
    """The guest of one kernel in directory (made when its recipe changed or it is not there):
    modules() gives the kernel's ModuleTree. A GuestBuildError (this kernel cannot have a
    guest) is remembered until the recipe changes; any other failure is told, not remembered,
    and the run goes on without a guest."""
    want = recipe(kernel, busybox)
    found = cached(directory, want)
    if found is not None:
        return found
    t = clock()
    shutil.rmtree(directory, ignore_errors=True)
    try:
        if busybox_deb is None:
            raise GuestBuildError("no busybox-static among the image's packages")
        if not busybox_deb.is_file():
            raise TestbedError(f"{busybox_deb} is not in the cache (tools/testbed build --refresh "
                               "downloads the image's packages again)")
        with modules() as tree:
            guest = make_guest(vmlinuz.read_bytes(), tree, read_busybox(busybox_deb))
    except GuestBuildError as exc:
        stamp = {"recipe": want, "missing": str(exc)}
        result = Cached(None, str(exc))
    except (TestbedError, OSError) as exc:
        info(f"warning: no nested Linux guest this time: {exc}")
        return Cached(None, f"the testbed could not make it: {exc}")
    else:
        write_guest_dir(guest, directory, image_link=vmlinuz)
        stamp = {"recipe": want, "note": guest.describe(), "modules": list(guest.modules),
                 "image": guest.image_kind}
        result = Cached(directory, guest.describe())
        info(f"nested Linux guest {guest.describe()} ({since(t):.1f}s)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    return result


def write_testbed_archive(out: BinaryIO, guest: Cached) -> None:
    """Appends one newc archive to a run's initrd: the guest at /opt/kvmits/linux-guest, or
    the note saying why there is none at /opt/kvmits/linux-guest.missing."""
    w = newc.NewcWriter(out, mtime=0)
    for d in newc.parent_dirs([GUEST_DIR]):
        w.add_dir(d)
    if guest.directory is None:
        w.add_file(MISSING_NOTE, (guest.note + "\n").encode())
    else:
        w.add_dir(GUEST_DIR)
        for name in FILES:
            w.add_path(f"{GUEST_DIR}/{name}", guest.directory / name)
    w.close()
