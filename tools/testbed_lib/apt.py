"""A private arm64 apt on the x86_64 host: Debian's archive, none of the host's dpkg state.

apt runs as if on an arm64 machine with nothing installed: the host's sources
(/etc/apt/sources.list{,.d}) but private package lists, archive cache and an empty dpkg
status file under the cache directory. So `apt-get -s install PKGS` prints exactly the
dependency closure of PKGS, and `apt-get download` fetches those .debs, checked against
the signed indices. The host's dpkg is never told about arm64 (no --add-architecture).

The same class, given its own source lines, is the apt of one extra Debian suite (trixie,
bookworm-backports, ...) for `--kernel`: then even the host's sources are not read, only
the lines written to its own sources.list, so nothing of that suite can reach the guest's
root file system, which is always resolved by the host-sources instance.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .errors import TestbedError
from .log import info

# What the guest's root file system is made of. busybox-static provides PID 1's shell and
# the usual tools; python3-cffi and python3-pytest are Debian's (cffi 1.15, pytest 7.2).
GUEST_PACKAGES = ("busybox-static", "python3", "python3-cffi", "python3-pytest")
# The metapackage naming Debian's current arm64 kernel; only its Image is used.
KERNEL_METAPACKAGE = "linux-image-arm64"
# Package lists older than this are refreshed before a build (a new kernel or security
# update then rebuilds the image).
LISTS_MAX_AGE = 24 * 3600

# "Inst NAME [OLDVER] (VERSION ORIGIN... [ARCH]) ..." as printed by `apt-get -s install`.
_INST = re.compile(r"^Inst (?P<name>[^\s:]+)(?::\S+)? (?:\[[^\]]*\] )?\((?P<version>\S+) .*\[(?P<arch>[a-z0-9]+)\]\)")
_KERNEL_IMAGE = re.compile(r"^linux-image-\d.*-arm64$")


@dataclass(frozen=True, order=True)
class Deb:
    name: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        # apt names downloaded archives NAME_VERSION_ARCH.deb, the epoch colon escaped.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"

    def __str__(self) -> str:
        return f"{self.name}={self.version}:{self.arch}"


def parse_simulation(output: str) -> list[Deb]:
    """The packages an `apt-get -s install` would install, in apt's order."""
    debs = []
    for line in output.splitlines():
        m = _INST.match(line)
        if m:
            debs.append(Deb(m["name"], m["version"], m["arch"]))
    return debs


def kernel_image(closure: list[Deb]) -> Deb:
    """The versioned kernel package (linux-image-6.1.0-N-arm64) in the metapackage's closure."""
    found = [d for d in closure if _KERNEL_IMAGE.match(d.name)]
    if len(found) != 1:
        raise TestbedError(f"expected one arm64 kernel image in the closure of {KERNEL_METAPACKAGE}, "
                           f"found {[str(d) for d in found]}")
    return found[0]


def lists_fresh(stamp: Path, now: float, max_age: float = LISTS_MAX_AGE) -> bool:
    try:
        return now - stamp.stat().st_mtime < max_age
    except FileNotFoundError:
        return False


class PrivateApt:
    def __init__(self, root: Path, sources: list[str] | None = None):
        self.root = root
        self.lists = root / "lists"
        self.archives = root / "cache" / "archives"
        self.status = root / "state" / "status"
        self.stamp = root / "lists.stamp"
        # None: the host's sources. Else one-line-style source entries, the only ones read.
        self.sources = sources
        self.sourcelist = root / "sources.list"
        self.sourceparts = root / "sources.list.d"

    def options(self) -> list[str]:
        r = self.root
        return [
            "-q",
            "-o", "APT::Architecture=arm64",
            "-o", "APT::Architectures::=arm64",         # '::=' empties the list: arm64 only
            "-o", f"Dir::State::status={self.status}",  # empty: nothing is installed
            "-o", f"Dir::State::Lists={self.lists}",
            "-o", f"Dir::Cache={r / 'cache'}",
            "-o", f"Dir::Cache::archives={self.archives}",
            # No binary caches (2 x 36 MB): closures are resolved once per lists update.
            "-o", "Dir::Cache::pkgcache=",
            "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Debug::NoLocking=1",                 # private dirs; we hold our own flock
            "-o", "APT::Install-Recommends=false",
            "-o", "Acquire::Languages=none",
            # apt would drop to user _apt to download, which cannot write under root's home.
            "-o", "APT::Sandbox::User=root",
        ] + ([] if self.sources is None else [
            # Replaces /etc/apt/sources.list and sources.list.d (an empty directory of ours):
            # the host's apt configuration is never extended by a suite of the testbed's.
            "-o", f"Dir::Etc::sourcelist={self.sourcelist}",
            "-o", f"Dir::Etc::sourceparts={self.sourceparts}",
        ])

    def prepare(self) -> None:
        for d in (self.lists / "partial", self.archives / "partial", self.status.parent):
            d.mkdir(parents=True, exist_ok=True)
        if not self.status.exists():
            self.status.write_text("")
        if self.sources is not None:
            self.sourceparts.mkdir(parents=True, exist_ok=True)
            text = "".join(line + "\n" for line in self.sources)
            try:
                current = self.sourcelist.read_text()
            except FileNotFoundError:
                current = None
            if current != text:
                self.sourcelist.write_text(text)
                # Lists fetched for other sources say nothing about these: update first.
                self.stamp.unlink(missing_ok=True)

    def _apt(self, tool: str, *args: str, cwd: Path | None = None, capture: bool = False) -> str:
        cmd = [tool, *self.options(), *args]
        proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, text=True,
                              stdout=subprocess.PIPE if capture else sys.stderr,
                              stderr=subprocess.PIPE if capture else None,
                              env=dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive"))
        if proc.returncode != 0:
            detail = (proc.stderr or "").strip() if capture else ""
            raise TestbedError(f"arm64 apt: '{tool} {' '.join(args)}' failed with status "
                               f"{proc.returncode}" + (f": {detail}" if detail else ""))
        return proc.stdout if capture else ""

    def update(self) -> None:
        which = "" if self.sources is None else f" of {self.root.name}"
        info(f"apt-get update (arm64 package lists{which}, private to the testbed cache)")
        self._apt("apt-get", "update", capture=True)
        self.stamp.touch()

    def lists_version(self) -> int:
        """Changes whenever the package lists do: closures are remembered per version."""
        return self.stamp.stat().st_mtime_ns

    def simulate(self, packages: tuple[str, ...] | list[str]) -> list[Deb]:
        out = self._apt("apt-get", "-s", "install", *packages, capture=True)
        closure = parse_simulation(out)
        if not closure:
            raise TestbedError(f"arm64 apt resolved nothing for {' '.join(packages)}")
        return closure

    def query(self, *args: str) -> str:
        """apt-cache's output for args (madison, show, ...)."""
        return self._apt("apt-cache", *args, capture=True)

    def download(self, debs: list[Deb]) -> None:
        missing = [d for d in debs if not (self.archives / d.filename).exists()]
        if missing:
            info(f"downloading {len(missing)} arm64 packages")
            self._apt("apt-get", "download", *(d.spec for d in missing), cwd=self.archives, capture=True)
        absent = [d.filename for d in debs if not (self.archives / d.filename).exists()]
        if absent:
            raise TestbedError(f"arm64 apt did not leave the expected archives: {absent}")

    def prune(self, keep: list[Deb]) -> None:
        """Removes downloaded archives no longer in any closure, so the cache stays bounded."""
        wanted = {d.filename for d in keep}
        for f in self.archives.glob("*.deb"):
            if f.name not in wanted:
                f.unlink()


class Resolver:
    """Package closures, remembered in a JSON file per package-lists version: resolving costs
    about a second of apt per request, and the lists change at most daily."""

    def __init__(self, apt: PrivateApt, memo: Path):
        self.apt = apt
        self.memo = memo

    def _load(self, version: int) -> dict:
        try:
            data = json.loads(self.memo.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data.get("requests", {}) if data.get("lists") == version else {}

    def closure(self, packages: tuple[str, ...] | list[str]) -> list[Deb]:
        version = self.apt.lists_version()
        known = self._load(version)
        key = " ".join(sorted(packages))
        if key not in known:
            known[key] = [[d.name, d.version, d.arch] for d in self.apt.simulate(packages)]
            tmp = self.memo.with_suffix(".tmp")
            tmp.write_text(json.dumps({"lists": version, "requests": known}, indent=1))
            tmp.replace(self.memo)
        return [Deb(*entry) for entry in known[key]]


def extract(deb: Path, dest: Path) -> None:
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise TestbedError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")


# Where a kernel package keeps the Image: ./boot/vmlinuz-<release> (bookworm, trixie), or
# ./usr/lib/modules/<release>/vmlinuz (Debian's 7.x packages, where linux-image-<abi> is an
# empty package depending on linux-binary-<abi>, which has it).
_VMLINUZ_MEMBER = re.compile(r"(?:\./)?(?:boot/vmlinuz-(?P<boot>.+)|usr/lib/modules/(?P<mod>[^/]+)/vmlinuz)")


def vmlinuz_member(name: str) -> str | None:
    """'vmlinuz-<release>' if the archive member name is a kernel Image, else None."""
    m = _VMLINUZ_MEMBER.fullmatch(name)
    return f"vmlinuz-{m['boot'] or m['mod']}" if m else None


def read_member(deb: Path, match) -> tuple[str, bytes] | None:
    """(match's answer, the file's bytes) for the first regular file of the .deb's data for
    whose member name match(name) returns something other than None; None if there is none.
    Stops reading the archive there."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                label = match(member.name)
                if member.isfile() and label is not None:
                    return label, tar.extractfile(member).read()
    except tarfile.TarError as exc:
        proc.kill()
        why = proc.stderr.read().decode(errors="replace").strip() or exc
        raise TestbedError(f"dpkg-deb --fsys-tarfile {deb} failed: {why}") from exc
    finally:
        proc.stdout.close()
        proc.kill()  # we may stop reading before the end of the archive
        proc.wait()
        proc.stderr.close()
    return None


def extract_kernel(deb: Path, dest: Path) -> str:
    """Writes the kernel Image from a linux-image .deb to dest; returns its file name.

    Only the Image is needed: Debian's arm64 kernel has KVM, the vGIC and its ITS built in
    (CONFIG_KVM=y), so the guest needs no modules."""
    found = read_member(deb, vmlinuz_member)
    if found is None:
        raise TestbedError(f"no ./boot/vmlinuz-* or ./usr/lib/modules/*/vmlinuz in {deb.name}")
    name, data = found
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return name


_PART_DEPENDS = re.compile(r"(linux-(binary|modules|base)-\S+-arm64) \(= ([^)\s]+)\)")


def kernel_parts(depends: str) -> dict[str, Deb]:
    """The parts of a kernel split over several packages, as a linux-image-<abi> package's
    Depends names them (Debian's 7.x): "binary" (linux-binary-<abi>, the Image), "modules"
    (linux-modules-<abi>) and "base" (linux-base-<abi>: modules.builtin, the device trees)."""
    return {m.group(2): Deb(m.group(1), m.group(3), "arm64") for m in _PART_DEPENDS.finditer(depends)}


def deb_field(deb: Path, field: str) -> str:
    proc = subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TestbedError(f"dpkg-deb -f {deb.name} {field} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()
