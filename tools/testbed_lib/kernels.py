"""Which kernel the guest boots (`--kernel K`), and where that kernel is cached.

K is one of
  - a Debian suite: bookworm (the default: the host's sources, the kernel of the cached
    image), bookworm-backports, trixie, trixie-backports, sid. The kernel is the version of
    the arm64 `linux-image-arm64` metapackage there, i.e. the versioned image package it
    depends on (linux-image-<abi>-arm64 = <version>);
  - a Debian kernel version or prefix of one ("6.12", "6.12.57", "6.1"): the newest
    linux-image-arm64 among KNOWN_SUITES whose version starts with it (on a component
    boundary: "6.1" is not "6.12");
  - a path to a user's own arm64 kernel Image (with an optional modules tree), or to a
    linux-image .deb (`make bindeb-pkg`), of which ./boot/vmlinuz-* and the modules are used.

The root file system is always bookworm's (base.cpio, resolved from the host's sources):
extra suites have their own private apt (apt.PrivateApt with its own sources.list) that
only ever resolves and downloads the one kernel image package. A kernel other than the
default is kept in kernels/<key>/ beside the image, so choosing one never rebuilds the
base initramfs.

Every kernel also gets its nested Linux guest (linux_guest.py): made from the kernel's own
Image and modules when the kernel is first fetched (before a suite's .debs are deleted) or
when the guest's recipe changes, and kept beside the kernel, in <its directory>/linux-guest/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import linux_guest, newc
from .apt import (KERNEL_METAPACKAGE, Deb, PrivateApt, deb_field, extract_kernel, kernel_parts, lists_fresh,
                  vmlinuz_member)
from .errors import TestbedError
from .log import clock, info, since
from .paths import Layout

DEFAULT_SUITE = "bookworm"
DEBIAN = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"
# Debian's archive keyring (package debian-archive-keyring, on every Debian host) has the
# keys of bookworm and trixie; sid is signed with the same automatic archive keys.
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Suite -> the archive suites (URI, suite) its kernels come from. None: the host's own
# sources (the testbed's default, whose lists also build the root file system). A release
# suite includes its -updates and -security suites: Debian's kernel updates go there first.
SUITES: dict[str, tuple[tuple[str, str], ...] | None] = {
    "bookworm": None,
    "bookworm-backports": ((DEBIAN, "bookworm-backports"),),
    "trixie": ((DEBIAN, "trixie"), (DEBIAN, "trixie-updates"), (DEBIAN_SECURITY, "trixie-security")),
    "trixie-backports": ((DEBIAN, "trixie-backports"),),
    "sid": ((DEBIAN, "sid"),),
}
# Searched, in this order, for a version prefix; on equal versions the first suite wins.
KNOWN_SUITES = tuple(SUITES)
# Kernels other than the default kept in kernels/ (the least recently used go first).
KERNELS_KEEP = 4
# Bump when what kernels/<key>/ holds changes in a way its stamp cannot see.
FORMAT = 1

_VERSION_SPEC = re.compile(r"\d[0-9A-Za-z.+~:-]*")
# arm64 Image header (Documentation/arch/arm64/booting.rst): "ARM\x64" at offset 0x38.
ARM64_MAGIC_OFFSET = 0x38
ARM64_MAGIC = b"ARMd"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class KernelSpec:
    """What --kernel asked for, before anything is resolved."""
    kind: str                  # "suite", "version", "image" or "deb"
    value: str                 # the suite, the version prefix, or the absolute path
    modules: str | None = None  # --modules DIR (absolute), only with "image" or "deb"

    @property
    def is_default(self) -> bool:
        return self.kind == "suite" and self.value == DEFAULT_SUITE


DEFAULT = KernelSpec("suite", DEFAULT_SUITE)


def parse_spec(text: str, modules: str | None = None, exists=os.path.exists,
               cwd: str | None = None) -> KernelSpec:
    """Classifies K: a known suite name, else a version (starts with a digit, no '/'), else a
    path. Raises ValueError saying what was looked for when it is none of them."""
    if not text:
        raise ValueError("empty --kernel")
    base = cwd if cwd is not None else os.getcwd()
    mods = os.path.normpath(os.path.join(base, modules)) if modules else None
    if text in SUITES:
        kind, value = "suite", text
    elif "/" not in text and _VERSION_SPEC.fullmatch(text):
        kind, value = "version", text
    else:
        path = os.path.normpath(os.path.join(base, text))
        if not exists(path):
            if "/" in text or text.endswith(".deb"):
                raise ValueError(f"--kernel {text}: no such file ({path})")
            raise ValueError(f"--kernel {text!r}: not a Debian suite ({', '.join(SUITES)}), "
                             "not a kernel version (e.g. 6.12 or 6.12.57), and no such file")
        kind = "deb" if text.endswith(".deb") else "image"
        value = path
    if mods is not None and kind not in ("image", "deb"):
        raise ValueError(f"--modules goes with a kernel file (--kernel PATH), not with "
                         f"the Debian {kind} {value!r}: Debian's kernels have KVM built in")
    if mods is not None and not exists(mods):
        raise ValueError(f"--modules {modules}: no such directory ({mods})")
    return KernelSpec(kind, value, mods)


# --- Debian versions -----------------------------------------------------------------------

def _order(c: str) -> int:
    # dpkg's ordering of the non-digit parts: '~' before everything, even the end of the
    # part; letters before all other characters.
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        # the non-digit run, character by character (the end of a run counts as 0)
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        # the digit run, as a number (empty counts as 0)
        i0, j0 = i, j
        while i < len(a) and a[i].isdigit():
            i += 1
        while j < len(b) and b[j].isdigit():
            j += 1
        an, bn = int(a[i0:i] or 0), int(b[j0:j] or 0)
        if an != bn:
            return -1 if an < bn else 1
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, sep, rest = v.partition(":")
    if not sep:
        epoch, rest = "0", v
    upstream, sep, revision = rest.rpartition("-")
    if not sep:
        upstream, revision = rest, ""
    return int(epoch or 0), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version a sorts before, equal to or after b (Debian Policy 5.6.12:
    epoch, then upstream version, then revision, each by dpkg's algorithm)."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def version_matches(version: str, prefix: str) -> bool:
    """Does version start with prefix on a component boundary ("6.1" matches 6.1.158-1,
    not 6.12.57-1)?"""
    if not version.startswith(prefix):
        return False
    rest = version[len(prefix):]
    return not rest or not (rest[0].isdigit() and prefix[-1].isdigit())


# --- apt output ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One linux-image-arm64 version in one suite, and the image package it names."""
    suite: str     # the --kernel suite (trixie)
    archive: str   # the archive suite apt found it in (trixie-security)
    version: str
    package: str   # linux-image-6.12.57+deb13-arm64

    @property
    def deb(self) -> Deb:
        return Deb(self.package, self.version, "arm64")

    def describe(self) -> str:
        where = self.suite if self.archive in ("", self.suite) else f"{self.suite}, from {self.archive}"
        return f"{self.package}={self.version} ({where})"


def parse_madison(output: str) -> list[tuple[str, str]]:
    """(version, archive suite) pairs from `apt-cache madison linux-image-arm64`, whose lines
    read 'linux-image-arm64 | 6.12.57-1 | http://deb.debian.org/debian trixie/main arm64 Packages'."""
    found = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3 or parts[0] != KERNEL_METAPACKAGE:
            continue
        where = parts[2].split()
        suite = where[1].split("/")[0] if len(where) >= 2 else ""
        found.append((parts[1], suite))
    return found


_IMAGE_DEPENDS = re.compile(r"(linux-image-\S+-arm64) \(= ([^)\s]+)\)")


def parse_show(output: str) -> dict[str, str]:
    """version -> versioned image package, from `apt-cache show linux-image-arm64` (all its
    stanzas: 'Version: 6.12.57-1' and 'Depends: linux-image-6.12.57+deb13-arm64 (= 6.12.57-1)')."""
    table = {}
    for stanza in re.split(r"\n\s*\n", output):
        fields = {}
        for line in stanza.splitlines():
            name, sep, value = line.partition(": ")
            if sep and not line.startswith(" "):
                fields[name] = value.strip()
        if fields.get("Package") != KERNEL_METAPACKAGE or "Version" not in fields:
            continue
        m = _IMAGE_DEPENDS.search(fields.get("Depends", ""))
        if m and m.group(2) == fields["Version"]:
            table[fields["Version"]] = m.group(1)
    return table


def candidates(suite: str, madison: str, show: str) -> list[Candidate]:
    """The kernels a suite has, newest first."""
    packages = parse_show(show)
    seen = {}
    for version, archive in parse_madison(madison):
        if version in packages and version not in seen:
            seen[version] = Candidate(suite, archive, version, packages[version])
    return sorted(seen.values(), key=_version_key, reverse=True)


def _version_key(c: Candidate):
    return functools.cmp_to_key(compare_versions)(c.version)


def choose(spec: KernelSpec, tables: dict[str, list[Candidate]]) -> Candidate:
    """The Debian kernel a suite or version spec names, from each suite's candidates.
    Raises TestbedError (125) naming what was looked for and what there is."""
    if spec.kind == "suite":
        found = tables.get(spec.value) or []
        if not found:
            raise TestbedError(f"--kernel {spec.value}: the arm64 package lists of {spec.value} "
                               f"have no {KERNEL_METAPACKAGE}")
        return found[0]
    if spec.kind != "version":
        raise ValueError(f"not a Debian kernel spec: {spec}")
    best = None
    for suite in KNOWN_SUITES:
        for c in tables.get(suite, []):
            if version_matches(c.version, spec.value) and (
                    best is None or compare_versions(c.version, best.version) > 0):
                best = c
    if best is None:
        have = "; ".join(f"{s}: {', '.join(c.version for c in tables.get(s, [])) or 'none'}"
                         for s in KNOWN_SUITES if s in tables)
        raise TestbedError(f"--kernel {spec.value}: no {KERNEL_METAPACKAGE} version starting "
                           f"with {spec.value} in {', '.join(KNOWN_SUITES)} ({have})")
    return best


# --- the chosen kernel ---------------------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """What a run boots: the Image, the modules archive to add to the initrd (if any), and
    the one line that says which kernel it is, in every report."""
    vmlinuz: Path
    modules_cpio: Path | None
    description: str
    key: str  # the cache key: "default", or kernels/<key>
    modules_release: str | None = None  # the release of modules_cpio's /lib/modules/<release>
    # the nested Linux guest made from this kernel (or why there is none)
    guest: linux_guest.Cached | None = None


def debian_key(deb: Deb) -> str:
    return f"{deb.name}_{deb.version.replace(':', '%3a')}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def modules_tree(directory: str) -> tuple[str, Path]:
    """(kernel release, tree) of --modules DIR: DIR itself when it is a lib/modules/<release>
    tree (has modules.dep, modules.order or kernel/), else the one <release> under
    DIR/lib/modules or DIR/usr/lib/modules (as `make modules_install INSTALL_MOD_PATH=DIR`
    leaves it)."""
    d = Path(directory)
    if not d.is_dir():
        raise TestbedError(f"--modules {directory}: not a directory")
    if any((d / name).exists() for name in ("modules.dep", "modules.order", "kernel")):
        return d.name, d
    releases = [p for sub in ("lib/modules", "usr/lib/modules") if (d / sub).is_dir()
                for p in sorted((d / sub).iterdir()) if p.is_dir()]
    if len(releases) == 1:
        return releases[0].name, releases[0]
    raise TestbedError(f"--modules {directory}: expected a lib/modules/<release> tree (with "
                       f"modules.dep, modules.order or kernel/) or a directory with exactly one "
                       f"lib/modules/<release> in it; found {[str(p) for p in releases] or 'neither'}")


def tree_manifest_digest(tree: Path) -> str:
    """A digest of the names, sizes and modification times under tree: cheap (no file is
    read), and changes when `make modules_install` writes the tree again."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, tree)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def modules_prefix(release: str) -> str:
    return f"lib/modules/{release}"


def pack_modules_tree(tree: Path, release: str, out: Path) -> int:
    """Writes a newc archive with the tree at /lib/modules/<release>; returns the entry count."""
    prefix = modules_prefix(release)
    with open(out, "wb") as f:
        w = newc.NewcWriter(f)
        for d in ("lib", "lib/modules", prefix):
            w.add_dir(d)
        count = w.add_tree(tree, prefix + "/")
        w.close()
    return count + 3


_DEB_MODULES = re.compile(r"(?:\./)?(?:usr/)?lib/modules/([^/]+)(/.*)?")


def unpack_kernel_deb(deb: Path, vmlinuz: Path, modules_out: Path | None) -> tuple[str, str | None]:
    """From a linux-image .deb: ./boot/vmlinuz-* to vmlinuz, and (if modules_out) its
    lib/modules/<release> (or usr/lib/modules/<release>, trixie's layout) as a newc archive
    at /lib/modules/<release>. Returns (the vmlinuz name, the modules' release or None)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    found = release = None
    out = open(modules_out, "wb") if modules_out else None
    writer = newc.NewcWriter(out) if out else None
    data_of: dict[str, bytes] = {}  # for tar hard links, stored as copies
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = vmlinuz_member(member.name)
                if name and member.isfile():
                    tmp = vmlinuz.with_suffix(".tmp")
                    tmp.write_bytes(tar.extractfile(member).read())
                    tmp.replace(vmlinuz)
                    found = name
                    continue
                m = _DEB_MODULES.fullmatch(member.name.rstrip("/"))
                if not m or writer is None:
                    continue
                if release is None:
                    release = m.group(1)
                    for d in ("lib", "lib/modules"):
                        writer.add_dir(d)
                elif m.group(1) != release:
                    raise TestbedError(f"{deb.name} has modules of two kernel releases: "
                                       f"{release} and {m.group(1)}")
                name = modules_prefix(release) + (m.group(2) or "")
                perm = member.mode & 0o7777
                if member.isdir():
                    writer.add_dir(name, perm)
                elif member.issym():
                    writer.add_symlink(name, member.linkname)
                elif member.islnk():
                    target = data_of.get(member.linkname.lstrip("./")) or b""
                    writer.add_file(name, target, perm)
                elif member.isfile():
                    data = tar.extractfile(member).read()
                    data_of[member.name.lstrip("./")] = data
                    writer.add_file(name, data, perm)
        # the end-of-archive blocks leave tar's padding unread: drain it, or dpkg-deb
        # would fail on a broken pipe and look like a bad .deb
        while proc.stdout.read(1 << 16):
            pass
    finally:
        proc.stdout.close()
        proc.wait()
        if writer is not None:
            writer.close()
            out.close()
    if proc.returncode != 0:
        raise TestbedError(f"dpkg-deb --fsys-tarfile {deb} failed: {proc.stderr.read().decode().strip()}")
    if found is None:
        raise TestbedError(f"no ./boot/vmlinuz-* or ./usr/lib/modules/*/vmlinuz in {deb}: "
                           "not a linux-image package")
    return found, release


def check_image(path: Path) -> str:
    """What kind of arm64 kernel file path is ("Image", "gzip'ed Image"); raises TestbedError
    for anything qemu's -kernel would not boot as an arm64 Linux kernel."""
    with open(path, "rb") as f:
        head = f.read(0x40)
    if head[:2] == GZIP_MAGIC:
        return "gzip'ed Image"
    if head[ARM64_MAGIC_OFFSET:ARM64_MAGIC_OFFSET + 4] == ARM64_MAGIC:
        return "Image"
    if head[:2] == b"MZ" and head[4:8] == b"zimg":
        raise TestbedError(f"--kernel {path}: an EFI zboot image (CONFIG_EFI_ZBOOT), which "
                           f"qemu's -kernel of Debian 12 cannot boot; give arch/arm64/boot/Image")
    raise TestbedError(f"--kernel {path}: not an arm64 kernel Image (no 'ARM\\x64' magic at "
                       f"offset {ARM64_MAGIC_OFFSET:#x}, not gzip): e.g. arch/arm64/boot/Image "
                       "of a kernel build, or a linux-image .deb")


class KernelStore:
    """kernels/<key>/: vmlinuz, modules.cpio (optional) and stamp.json (the description, what
    it was made from). Every use touches the stamp; the least recently used go beyond
    KERNELS_KEEP."""

    def __init__(self, layout: Layout):
        self.root = layout.kernels

    def lookup(self, key: str, description: str) -> Kernel | None:
        d = self.root / key
        try:
            stamp = json.loads((d / "stamp.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if stamp.get("format") != FORMAT or stamp.get("description") != description \
                or not (d / "vmlinuz").is_file():
            return None
        modules = d / "modules.cpio" if stamp.get("modules") else None
        if modules is not None and not modules.is_file():
            return None
        os.utime(d / "stamp.json")
        return Kernel(d / "vmlinuz", modules, description, key, stamp.get("modules"))

    def put(self, key: str, description: str, make) -> Kernel:
        """make(directory) writes vmlinuz (and modules.cpio) into a fresh directory and returns
        the modules' release or None; the directory then replaces kernels/<key>."""
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / f".{key}.new"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            release = make(work)
            (work / "stamp.json").write_text(json.dumps(
                {"format": FORMAT, "key": key, "description": description, "modules": release},
                indent=1) + "\n")
            final = self.root / key
            # A booting run has hard links to its files: removing the old directory is safe.
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.prune(keep=key)
        return self.lookup(key, description)

    def prune(self, keep: str, limit: int = KERNELS_KEEP) -> None:
        entries = []
        for d in self.root.iterdir():
            if d.name.startswith("."):
                # a half-made directory of a build killed outright; a live build holds the lock
                shutil.rmtree(d, ignore_errors=True)
                continue
            try:
                entries.append(((d / "stamp.json").stat().st_mtime, d))
            except FileNotFoundError:
                entries.append((0.0, d))
        entries.sort(reverse=True)
        kept = 0
        for _, d in entries:
            if d.name == keep or kept < limit - 1:
                kept += d.name != keep
                continue
            shutil.rmtree(d, ignore_errors=True)


def suite_apt(layout: Layout, suite: str) -> PrivateApt:
    entries = SUITES[suite]
    sources = [f"deb [signed-by={KEYRING}] {uri} {name} main" for uri, name in entries]
    return PrivateApt(layout.suites / suite, sources)


def suite_table(apt: PrivateApt, suite: str, refresh: bool, now: float | None = None) -> list[Candidate]:
    """The kernels of a suite, from its apt (lists updated when older than a day, or on
    --refresh); remembered per lists version in kernels.json, so a cached run asks apt nothing."""
    apt.prepare()
    if refresh or not lists_fresh(apt.stamp, time.time() if now is None else now):
        try:
            apt.update()
        except TestbedError as exc:
            if not apt.stamp.exists():
                raise
            info(f"warning: {exc}; going on with the {suite} package lists of an earlier update")
    memo = apt.root / "kernels.json"
    version = apt.lists_version()
    try:
        data = json.loads(memo.read_text())
    except (FileNotFoundError, ValueError):
        data = {}
    if data.get("lists") != version:
        found = candidates(suite, apt.query("madison", KERNEL_METAPACKAGE),
                           apt.query("show", KERNEL_METAPACKAGE))
        data = {"lists": version, "candidates": [[c.archive, c.version, c.package] for c in found]}
        tmp = memo.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(memo)
    return [Candidate(suite, *entry) for entry in data["candidates"]]


def default_description(image_stamp: dict) -> str:
    """'linux-image-6.1.0-57-arm64=6.1.192-3 (bookworm)' from the image stamp's kernel entry
    ('name=version:arch')."""
    spec = image_stamp["kernel"].rsplit(":", 1)[0]
    return f"{spec} ({DEFAULT_SUITE})"


def stamp_deb(entry: str) -> Deb:
    """The Deb of an image stamp's package entry ('name=version:arch', as str(Deb) writes it)."""
    name, _, rest = entry.partition("=")
    version, _, arch = rest.rpartition(":")
    return Deb(name, version, arch)


# --- the nested Linux guest of a kernel ------------------------------------------------------

GUEST_DIR = "linux-guest"


def _with_guest(layout: Layout, kernel: Kernel, image_stamp: dict, modules) -> Kernel:
    """kernel with its nested Linux guest, made if needed: modules() is a context manager
    giving the kernel's linux_guest.ModuleTree. The guest's busybox is the image's."""
    busybox = next((e for e in image_stamp.get("guest_packages", ())
                    if e.startswith("busybox-static=")), None)
    deb = layout.archives / stamp_deb(busybox).filename if busybox else None
    guest = linux_guest.ensure(kernel.vmlinuz.parent / GUEST_DIR, kernel.vmlinuz, kernel.description,
                               deb, busybox, modules)
    return dataclasses.replace(kernel, guest=guest)


def _no_modules(why: str):
    raise linux_guest.GuestBuildError(why)


@contextlib.contextmanager
def _deb_modules(apt: PrivateApt, debs: list[Deb], layout: Layout):
    apt.download(debs)   # nothing to do when they are still there
    with linux_guest.deb_modules([apt.archives / d.filename for d in debs], layout.root) as tree:
        yield tree


class _SuiteDebs:
    """A Debian kernel's .debs, downloaded the first time they are asked for, and deleted at the
    end unless they are the host sources' (pruned with the image's closure instead): for the
    Image, the linux-image package, or its linux-binary (Debian's 7.x); for the guest's modules,
    also linux-modules and linux-base (modules.builtin) when the kernel is split so."""

    def __init__(self, apt: PrivateApt, chosen: Candidate, keep: bool):
        self.apt, self.chosen, self.keep = apt, chosen, keep
        self.fetched: list[Deb] = []
        self._parts: dict[str, Deb] | None = None

    def _get(self, debs: list[Deb]) -> list[Path]:
        new = [d for d in debs if d not in self.fetched]
        if new:
            self.apt.download(new)
            self.fetched += new
        return [self.apt.archives / d.filename for d in debs]

    def parts(self) -> dict[str, Deb]:
        if self._parts is None:
            self._get([self.chosen.deb])
            self._parts = kernel_parts(deb_field(self.apt.archives / self.chosen.deb.filename, "Depends"))
        return self._parts

    def image(self) -> Path:
        """The .deb with the Image."""
        binary = self.parts().get("binary")
        # 7.x packaging: the Image is in linux-binary-<abi>, linux-image-<abi> is empty
        return self._get([binary or self.chosen.deb])[-1]

    def everything(self) -> list[Path]:
        """The .debs that together hold the Image, the modules and modules.builtin."""
        parts = self.parts()
        return self._get([self.chosen.deb] + [parts[k] for k in ("base", "binary", "modules") if k in parts])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.keep:
            # the .debs (up to 100 MB with modules) are not needed again
            for d in self.fetched:
                (self.apt.archives / d.filename).unlink(missing_ok=True)


def ensure_kernel(layout: Layout, spec: KernelSpec, image_stamp: dict, refresh: bool = False) -> Kernel:
    """The kernel to boot for spec, fetched or unpacked into kernels/ when not there yet.
    Call with the build lock held, after build.ensure_image (whose stamp names the default
    kernel)."""
    if spec.is_default:
        return _default_kernel(layout, image_stamp)
    if spec.kind in ("suite", "version"):
        return _ensure_debian(layout, spec, image_stamp, refresh)
    if spec.kind == "image":
        return _ensure_user_image(layout, spec, image_stamp)
    return _ensure_user_deb(layout, spec, image_stamp)


def _tables(layout: Layout, spec: KernelSpec, refresh: bool) -> dict[str, list[Candidate]]:
    suites = [spec.value] if spec.kind == "suite" else list(KNOWN_SUITES)
    tables = {}
    for suite in suites:
        apt = PrivateApt(layout.apt) if SUITES[suite] is None else suite_apt(layout, suite)
        tables[suite] = suite_table(apt, suite, refresh)
    return tables


def _default_kernel(layout: Layout, image_stamp: dict) -> Kernel:
    kernel = Kernel(layout.kernel, None, default_description(image_stamp), "default")
    debs = [stamp_deb(image_stamp["kernel"])]
    return _with_guest(layout, kernel, image_stamp, lambda: _deb_modules(PrivateApt(layout.apt), debs, layout))


def _ensure_debian(layout: Layout, spec: KernelSpec, image_stamp: dict, refresh: bool) -> Kernel:
    chosen = choose(spec, _tables(layout, spec, refresh))
    if str(chosen.deb) == image_stamp["kernel"]:
        # the version prefix named the default kernel: the image's own
        return _default_kernel(layout, image_stamp)
    key = debian_key(chosen.deb)
    description = chosen.describe()
    store = KernelStore(layout)
    apt = PrivateApt(layout.apt) if SUITES[chosen.suite] is None else suite_apt(layout, chosen.suite)
    # the guest's modules come from the same .debs as the Image: one download for both
    with _SuiteDebs(apt, chosen, keep=SUITES[chosen.suite] is None) as debs:
        found = store.lookup(key, description)
        if found is None:
            t = clock()

            def make(work: Path) -> None:
                name = extract_kernel(debs.image(), work / "vmlinuz")
                info(f"kernel {name} from {description} ({since(t):.1f}s)")
                return None

            found = store.put(key, description, make)
        return _with_guest(layout, found, image_stamp, lambda: linux_guest.deb_modules(
            debs.everything(), layout.root))


def _modules_part(spec: KernelSpec) -> tuple[str, str, tuple[str, Path] | None]:
    """(key suffix, description suffix, (release, tree)) for --modules."""
    if not spec.modules:
        return "", "", None
    release, tree = modules_tree(spec.modules)
    digest = tree_manifest_digest(tree)
    return f"-modules-{digest[:12]}", f", modules {release} from {tree}", (release, tree)


def _user_identity(spec: KernelSpec, prefix: str, what: str):
    """(key, description, --modules part) of a user's file: by its sha256 and its modules."""
    path = Path(spec.value)
    sha = file_sha256(path)
    key_mods, desc_mods, mods = _modules_part(spec)
    return f"{prefix}-{sha[:16]}{key_mods}", f"user {what} {path} sha256:{sha[:16]}{desc_mods}", mods


def _ensure_user_image(layout: Layout, spec: KernelSpec, image_stamp: dict) -> Kernel:
    path = Path(spec.value)
    kind = check_image(path)
    t = clock()
    key, description, mods = _user_identity(spec, "image", kind)
    store = KernelStore(layout)
    found = store.lookup(key, description) or store.put(key, description, lambda work: _copy_user_image(
        path, work, mods, t))
    if mods is None:
        return _with_guest(layout, found, image_stamp, lambda: _no_modules(
            "a user Image without --modules DIR has no modules for it: give --modules (a "
            "lib/modules/<release> tree with virtio_pci, virtio_blk and virtio_rng or a "
            "modules.builtin naming them), or a linux-image .deb"))
    release, tree = mods
    return _with_guest(layout, found, image_stamp, lambda: contextlib.nullcontext(
        linux_guest.ModuleTree.scan(tree, release)))


def _copy_user_image(path: Path, work: Path, mods: tuple[str, Path] | None, t: float) -> str | None:
    # a copy, not a link: the developer may rebuild the file while the guest boots
    shutil.copyfile(path, work / "vmlinuz")
    if mods is None:
        return None
    release, tree = mods
    count = pack_modules_tree(tree, release, work / "modules.cpio")
    info(f"modules {release}: {count} entries from {tree} ({since(t):.1f}s)")
    return release


def _ensure_user_deb(layout: Layout, spec: KernelSpec, image_stamp: dict) -> Kernel:
    path = Path(spec.value)
    t = clock()
    key, description, mods = _user_identity(spec, "deb", ".deb")
    store = KernelStore(layout)
    found = store.lookup(key, description) or store.put(key, description, lambda work: _unpack_user_deb(
        path, work, mods, t))
    if found.modules_release and not mods:
        # only known once unpacked, so not part of the key's description
        found = dataclasses.replace(found, description=f"{found.description}, its modules "
                                                       f"{found.modules_release}")
    if mods is not None:
        release, tree = mods
        return _with_guest(layout, found, image_stamp, lambda: contextlib.nullcontext(
            linux_guest.ModuleTree.scan(tree, release)))
    return _with_guest(layout, found, image_stamp, lambda: linux_guest.deb_modules([path], layout.root))


def _unpack_user_deb(path: Path, work: Path, mods: tuple[str, Path] | None, t: float) -> str | None:
    # the .deb's own modules unless --modules replaces them
    name, release = unpack_kernel_deb(path, work / "vmlinuz",
                                      None if mods else work / "modules.cpio")
    if mods is not None:
        release, tree = mods
        pack_modules_tree(tree, release, work / "modules.cpio")
    elif release is None:
        (work / "modules.cpio").unlink(missing_ok=True)
    check_image(work / "vmlinuz")
    info(f"kernel {name} from {path}" + (f", modules {release}" if release else "")
         + f" ({since(t):.1f}s)")
    return release
