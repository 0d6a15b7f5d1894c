"""The cache logic of build.ensure_image, with apt, pip and the image builder replaced by fakes."""

import fcntl
import json
from pathlib import Path

import pytest

from testbed_lib import build
from testbed_lib.apt import Deb
from testbed_lib.errors import TestbedError
from testbed_lib.paths import Layout

KERNEL_CLOSURE = ["kmod", "linux-image-6.1.0-56-arm64", "linux-image-arm64"]


class Archive:
    """What the fake apt knows: package versions, and what fails."""

    def __init__(self):
        self.version = "1"
        self.updates = self.simulations = self.downloads = 0
        self.fail_update = False
        self.fail_downloads = 0


class FakeApt:
    archive: Archive

    def __init__(self, root: Path):
        self.root = root
        self.stamp = root / "lists.stamp"

    def prepare(self):
        self.root.mkdir(parents=True, exist_ok=True)

    def update(self):
        if self.archive.fail_update:
            raise TestbedError("apt-get update failed")
        self.archive.updates += 1
        self.stamp.write_text(self.archive.version)  # new mtime: a new lists version

    def lists_version(self):
        return self.stamp.stat().st_mtime_ns + int(self.stamp.read_text())

    def simulate(self, packages):
        self.archive.simulations += 1
        names = KERNEL_CLOSURE if packages == ("linux-image-arm64",) else ["python3.11", *packages]
        return [Deb(n, f"{self.archive.version}.0", "arm64") for n in names]

    def download(self, debs):
        if self.archive.fail_downloads:
            self.archive.fail_downloads -= 1
            raise TestbedError("arm64 apt: 'apt-get download' failed")
        self.archive.downloads += 1

    def prune(self, keep):
        pass


@pytest.fixture
def env(fs, monkeypatch):
    archive = Archive()
    FakeApt.archive = archive
    monkeypatch.setattr(build, "PrivateApt", FakeApt)
    builds = []

    def fake_build(layout, guest, kernel, wheels, compiler, python_version, stamp):
        builds.append(stamp)
        layout.image.mkdir(parents=True, exist_ok=True)
        layout.kernel.write_text(kernel.name)
        layout.base_cpio.write_text("cpio")
        layout.image_stamp.write_text(json.dumps(stamp))

    monkeypatch.setattr(build, "build_image", fake_build)
    wheel_calls = []

    def fake_wheels(pip, requirements, root, python_version, refresh=False):
        wheel_calls.append((requirements, python_version, refresh))
        return [Path("/w/fdt-0.3.3-py3-none-any.whl")]

    monkeypatch.setattr(build, "fetch_wheels", fake_wheels)
    monkeypatch.setattr(build.host, "python_for", lambda version: f"/usr/bin/python{version}")
    fs.create_file("/src/pyproject.toml", contents='[project]\ndependencies = ["cffi>=1.15", "fdt>=0.3.3"]\n')
    layout = Layout(Path("/cache/testbed"))

    def ensure(**kw):
        return build.ensure_image(layout, source_root=Path("/src"), **kw)

    return archive, builds, wheel_calls, layout, ensure


def test_first_build_then_nothing_to_do(env):
    archive, builds, wheel_calls, layout, ensure = env
    stamp = ensure()
    assert len(builds) == 1 and builds[0] == stamp
    assert stamp["kernel"] == "linux-image-6.1.0-56-arm64=1.0:arm64"
    assert "python3.11=1.0:arm64" in stamp["guest_packages"] and stamp["bytecode"] == "3.11"
    assert wheel_calls[0] == (["fdt>=0.3.3"], "3.11", False)
    assert (archive.updates, archive.simulations, archive.downloads) == (1, 2, 1)

    assert ensure() == stamp
    assert len(builds) == 1                          # cached: no rebuild,
    assert (archive.updates, archive.simulations, archive.downloads) == (1, 2, 1)  # no apt at all


def test_new_package_versions_rebuild(env, capsys):
    archive, builds, _, layout, ensure = env
    ensure()
    archive.version = "2"
    ensure()                                   # lists are fresh: apt is not asked, no rebuild
    assert len(builds) == 1
    stamp = ensure(refresh=True)
    assert len(builds) == 2 and stamp["kernel"].endswith("=2.0:arm64")
    assert "building the image (kernel, guest_packages)" in capsys.readouterr().err


def test_force_rebuilds(env):
    _, builds, _, _, ensure = env
    ensure()
    ensure(force=True)
    assert len(builds) == 2


def test_a_vanished_package_version_updates_and_retries_once(env):
    archive, builds, _, _, ensure = env
    archive.fail_downloads = 1
    ensure()
    assert archive.updates == 2 and len(builds) == 1
    archive.fail_downloads = 2
    with pytest.raises(TestbedError, match="download"):
        ensure(force=True)


def test_failed_update_falls_back_to_the_existing_image(env, capsys):
    archive, builds, _, layout, ensure = env
    stamp = ensure()
    archive.fail_update = True
    assert ensure(refresh=True) == stamp
    assert "warning: apt-get update failed" in capsys.readouterr().err


def test_failed_update_without_an_image_is_an_error(env):
    archive, _, _, _, ensure = env
    archive.fail_update = True
    with pytest.raises(TestbedError, match="apt-get update failed"):
        ensure()


def test_locked_excludes_other_holders(tmp_path):
    layout = Layout(tmp_path / "testbed")

    def try_lock():
        with open(layout.lock, "a") as other:  # another open file: flock treats it as another holder
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(other, fcntl.LOCK_UN)
            return True

    with build.locked(layout):
        assert not try_lock()
    assert try_lock()
