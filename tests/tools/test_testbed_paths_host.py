import sys
from pathlib import Path

import pytest

from testbed_lib import host, paths
from testbed_lib.errors import TestbedError


def test_cache_root_precedence():
    assert paths.cache_root({"KVMITS_CACHE": "/k", "XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/k/testbed")
    assert paths.cache_root({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/kvmits/testbed")
    assert paths.cache_root({"HOME": "/h"}) == Path("/h/.cache/kvmits/testbed")
    empty = {"KVMITS_CACHE": "", "XDG_CACHE_HOME": "", "HOME": "/h"}
    assert paths.cache_root(empty) == Path("/h/.cache/kvmits/testbed")


def test_layout_is_under_the_root():
    layout = paths.Layout(Path("/c/testbed"))
    for name in ("lock", "apt", "lists_stamp", "archives", "resolved", "wheels", "image", "kernel",
                 "base_cpio", "image_stamp", "logs", "runs"):
        assert Path("/c/testbed") in getattr(layout, name).parents


def test_source_root_is_this_repository():
    assert (paths.SOURCE_ROOT / "tools" / "testbed").is_file()
    assert (paths.SOURCE_ROOT / "pyproject.toml").is_file()


def test_missing_packages_each_once():
    have = {"apt-get", "make"}
    which = lambda p: f"/usr/bin/{p}" if p in have else None  # noqa: E731
    programs = {"apt-get": "apt", "apt-cache": "apt", "qemu-system-aarch64": "qemu-system-arm",
                "make": "make", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}
    assert host.missing_packages(programs, which) == ["apt", "qemu-system-arm", "gcc-aarch64-linux-gnu"]
    assert host.missing_packages({"make": "make"}, which) == []


def test_apt_install_refuses_clearly_without_root(monkeypatch):
    monkeypatch.setattr(host.shutil, "which", lambda p: "/usr/bin/apt-get")
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    with pytest.raises(TestbedError, match="run as root, or 'apt-get install qemu-system-arm'") as exc:
        host.apt_install(["qemu-system-arm"], "the arm64 testbed")
    assert exc.value.status == 125


def test_apt_install_refuses_clearly_without_apt(monkeypatch):
    monkeypatch.setattr(host.shutil, "which", lambda p: None)
    with pytest.raises(TestbedError, match="no apt-get"):
        host.apt_install(["qemu-system-arm"], "the arm64 testbed")


def test_python_for_the_running_version_is_this_interpreter():
    assert host.python_for("%d.%d" % sys.version_info[:2]) == sys.executable
