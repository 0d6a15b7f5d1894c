import json
import os
from pathlib import Path

import pytest

from testbed_lib import apt
from testbed_lib.apt import Deb
from testbed_lib.errors import TestbedError

# Trimmed from a real `apt-get -s install` with the private arm64 options, plus the forms
# apt uses for an upgrade ([oldversion]) and a qualified name.
SIMULATION = """\
NOTE: This is only a simulation!
Reading package lists...
The following NEW packages will be installed:
  busybox-static libc6 python3
Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [arm64])
Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [arm64]) []
Inst busybox-static (1:1.35.0-4+deb12u1+b1 Debian:12.15/oldstable [arm64])
Inst media-types (10.0.0 Debian:12.15/oldstable [all])
Inst libkrb5-3 (1.20.1-2+deb12u5 Debian:12.15/oldstable, Debian-Security:12/oldstable-security [arm64])
Inst zlib1g [1:1.2.13.dfsg-1] (1:1.2.13.dfsg-2 Debian:12.15/oldstable [arm64])
Inst python3.11:arm64 (3.11.2-6+deb12u9 Debian-Security:12/oldstable-security [arm64])
Conf gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [arm64])
"""


def test_parse_simulation():
    debs = apt.parse_simulation(SIMULATION)
    assert debs == [
        Deb("gcc-12-base", "12.2.0-14+deb12u1", "arm64"),
        Deb("libc6", "2.36-9+deb12u14", "arm64"),
        Deb("busybox-static", "1:1.35.0-4+deb12u1+b1", "arm64"),
        Deb("media-types", "10.0.0", "all"),
        Deb("libkrb5-3", "1.20.1-2+deb12u5", "arm64"),
        Deb("zlib1g", "1:1.2.13.dfsg-2", "arm64"),
        Deb("python3.11", "3.11.2-6+deb12u9", "arm64"),
    ]


def test_archive_file_names_escape_the_epoch():
    d = Deb("busybox-static", "1:1.35.0-4+deb12u1+b1", "arm64")
    assert d.filename == "busybox-static_1%3a1.35.0-4+deb12u1+b1_arm64.deb"
    assert d.spec == "busybox-static=1:1.35.0-4+deb12u1+b1"
    assert str(d) == "busybox-static=1:1.35.0-4+deb12u1+b1:arm64"


def test_kernel_image_is_the_versioned_package():
    closure = [Deb("kmod", "30", "arm64"), Deb("linux-image-6.1.0-56-arm64", "6.1.192-2", "arm64"),
               Deb("linux-image-arm64", "6.1.192-2", "arm64"), Deb("linux-base", "4.12", "all")]
    assert apt.kernel_image(closure).name == "linux-image-6.1.0-56-arm64"
    with pytest.raises(TestbedError):
        apt.kernel_image([Deb("linux-image-arm64", "6.1.192-2", "arm64")])


def test_private_options_never_touch_the_hosts_dpkg():
    a = apt.PrivateApt(Path("/c/apt"))
    opts = a.options()
    pairs = dict(opts[i + 1].split("=", 1) for i, o in enumerate(opts) if o == "-o")
    assert pairs["APT::Architecture"] == "arm64"
    assert pairs["APT::Architectures::"] == "arm64"  # the '::=' form that replaces the list
    assert pairs["Dir::State::status"] == "/c/apt/state/status"
    for key in ("Dir::State::Lists", "Dir::Cache", "Dir::Cache::archives"):
        assert pairs[key].startswith("/c/apt/")
    assert pairs["APT::Install-Recommends"] == "false"


def test_prepare_makes_an_empty_status(fs):
    a = apt.PrivateApt(Path("/c/apt"))
    a.prepare()
    assert a.status.read_text() == ""
    assert (a.lists / "partial").is_dir() and (a.archives / "partial").is_dir()
    a.status.write_text("kept")
    a.prepare()
    assert a.status.read_text() == "kept"


def test_lists_fresh(fs):
    stamp = Path("/c/apt/lists.stamp")
    assert not apt.lists_fresh(stamp, now=1e9)
    fs.create_file(stamp)
    os.utime(stamp, (1000, 1000))
    assert apt.lists_fresh(stamp, now=1000 + apt.LISTS_MAX_AGE - 1)
    assert not apt.lists_fresh(stamp, now=1000 + apt.LISTS_MAX_AGE + 1)


class FakeApt:
    def __init__(self):
        self.version = 1
        self.calls = []

    def lists_version(self):
        return self.version

    def simulate(self, packages):
        self.calls.append(tuple(packages))
        return [Deb(p, f"{self.version}.0", "arm64") for p in packages]


def test_resolver_remembers_closures_per_lists_version(fs):
    fs.create_dir("/c")
    fake = FakeApt()
    r = apt.Resolver(fake, Path("/c/resolved.json"))
    first = r.closure(("b", "a"))
    assert r.closure(("a", "b")) == first            # same request, any order: no apt call
    assert apt.Resolver(fake, Path("/c/resolved.json")).closure(("a", "b")) == first  # from the file
    assert fake.calls == [("b", "a")]
    r.closure(("k",))
    assert len(fake.calls) == 2
    fake.version = 2                                   # apt-get update happened
    assert r.closure(("a", "b"))[0].version == "2.0"
    assert len(fake.calls) == 3
    assert json.loads(Path("/c/resolved.json").read_text())["lists"] == 2


def test_resolver_survives_a_corrupt_memo(fs):
    fs.create_file("/c/resolved.json", contents="{not json")
    fake = FakeApt()
    assert apt.Resolver(fake, Path("/c/resolved.json")).closure(("a",)) == [Deb("a", "1.0", "arm64")]


def test_prune_keeps_only_the_closure(fs):
    a = apt.PrivateApt(Path("/c/apt"))
    keep = Deb("libc6", "2.36", "arm64")
    fs.create_file(a.archives / keep.filename)
    fs.create_file(a.archives / "old_1.0_arm64.deb")
    fs.create_file(a.archives / "partial" / "x")
    a.prune([keep])
    assert sorted(p.name for p in a.archives.iterdir()) == [keep.filename, "partial"]


def test_vmlinuz_members_of_both_package_layouts():
    assert apt.vmlinuz_member("./boot/vmlinuz-6.1.0-57-arm64") == "vmlinuz-6.1.0-57-arm64"
    assert apt.vmlinuz_member("./usr/lib/modules/7.2.13+deb14-arm64/vmlinuz") == "vmlinuz-7.2.13+deb14-arm64"
    for other in ("./boot/config-6.1.0-57-arm64", "./usr/lib/modules/7.2.13/kernel/vmlinuz.ko",
                  "./usr/lib/linux-image-6.12/vmlinuz"):
        assert apt.vmlinuz_member(other) is None


def test_kernel_parts():
    # sid's linux-image-7.2.13+deb14-arm64 (2026-12-02)
    depends = ("dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
               "linux-base-7.2.13+deb14-arm64 (= 7.2.13-1), linux-binary-7.2.13+deb14-arm64 (= 7.2.13-1), "
               "linux-modules-7.2.13+deb14-arm64 (= 7.2.13-1)")
    assert apt.kernel_parts(depends) == {
        "base": Deb("linux-base-7.2.13+deb14-arm64", "7.2.13-1", "arm64"),
        "binary": Deb("linux-binary-7.2.13+deb14-arm64", "7.2.13-1", "arm64"),
        "modules": Deb("linux-modules-7.2.13+deb14-arm64", "7.2.13-1", "arm64")}
    # Debian's linux-base (no ABI in its name) is another package
    assert apt.kernel_parts("kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool") == {}
