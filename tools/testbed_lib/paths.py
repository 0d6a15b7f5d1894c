"""Where the testbed keeps things: one cache directory, laid out as below.

    ${KVMITS_CACHE:-${XDG_CACHE_HOME:-~/.cache}/kvmits}/testbed/
        lock                  flock(2): one build at a time, runs never see a half-made image
        apt/                  private arm64 apt: lists/, cache/archives/*.deb, state/status (empty)
        apt/lists.stamp       mtime = last successful `apt-get update`
        resolved.json         package closures, remembered per package-lists version
        wheels/<key>/         pure-Python wheels for the guest, per requirement list
        image/                vmlinuz, base.cpio, stamp.json: what every boot uses (the
                              default kernel, bookworm's, is image/vmlinuz); linux-guest/:
                              that kernel's nested Linux guest (linux_guest.py)
        suites/<suite>/       a private arm64 apt per extra Debian suite (--kernel trixie...):
                              its own sources.list, lists and archives, only for kernels
        kernels/<key>/        a kernel other than the default: vmlinuz, modules.cpio (if any),
                              stamp.json, linux-guest/; key = Debian package and version, or
                              the sha256 of a user's Image or .deb (the newest few are kept)
        logs/                 one console log per run (the newest LOG_KEEP are kept)
        runs/                 per-run scratch (job archive, initrd), removed after the run
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The source tree this tool belongs to: tools/testbed_lib/paths.py -> the repository root.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def cache_root(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("KVMITS_CACHE"):
        base = Path(env["KVMITS_CACHE"])
    else:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
        base = Path(xdg) / "kvmits"
    return base / "testbed"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def apt(self) -> Path:
        return self.root / "apt"

    @property
    def lists_stamp(self) -> Path:
        return self.apt / "lists.stamp"

    @property
    def archives(self) -> Path:
        return self.apt / "cache" / "archives"

    @property
    def resolved(self) -> Path:
        return self.root / "resolved.json"

    @property
    def wheels(self) -> Path:
        return self.root / "wheels"

    @property
    def image(self) -> Path:
        return self.root / "image"

    @property
    def kernel(self) -> Path:
        return self.image / "vmlinuz"

    @property
    def base_cpio(self) -> Path:
        return self.image / "base.cpio"

    @property
    def image_stamp(self) -> Path:
        return self.image / "stamp.json"

    @property
    def suites(self) -> Path:
        return self.root / "suites"

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def runs(self) -> Path:
        return self.root / "runs"
