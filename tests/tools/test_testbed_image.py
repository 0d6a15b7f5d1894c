import json
import stat
import subprocess
from pathlib import Path

import pytest

from testbed_lib import image
from testbed_lib.apt import Deb
from testbed_lib.console import EXIT, START
from testbed_lib.errors import TestbedError
from testbed_lib.paths import Layout

from .newc_reader import read_archives

GUEST = [Deb("libc6", "2.36-9", "arm64"), Deb("python3.11", "3.11.2-6", "arm64"),
         Deb("python3", "3.11.2-1", "arm64"), Deb("busybox-static", "1:1.35.0-4", "arm64")]
KERNEL = Deb("linux-image-6.1.0-56-arm64", "6.1.192-2", "arm64")


def stamp(**kw):
    args = dict(guest=GUEST, kernel=KERNEL, wheels=["fdt-0.3.3-py3-none-any.whl"], bytecode="3.11")
    args.update(kw)
    return image.make_stamp(**args)


def test_init_script_shape():
    init = image.init_script()
    assert init.startswith("#!/bin/busybox sh\n")
    for mount in ("mount -t proc proc /proc", "mount -t sysfs sysfs /sys",
                  "mount -t devtmpfs devtmpfs /dev", "tmpfs /tmp\n", "tmpfs /dev/shm\n"):
        assert mount in init
    order = [init.index(s) for s in (f'echo "{START} $token', "/job/run </dev/null",
                                     f'echo "{EXIT} $token $rc', "poweroff -f")]
    assert order == sorted(order), "markers must bracket the job, power-off comes last"
    assert 'kvmits.token=*) token="${arg#kvmits.token=}"' in init


def test_init_script_is_valid_posix_shell(tmp_path):
    path = tmp_path / "init"
    path.write_text(image.init_script())
    proc = subprocess.run(["/bin/sh", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_stamp_changes_with_every_input():
    base = stamp()
    assert stamp() == base
    variants = {
        "guest_packages": stamp(guest=GUEST[:-1] + [Deb("busybox-static", "1:1.35.0-5", "arm64")]),
        "kernel": stamp(kernel=Deb("linux-image-6.1.0-57-arm64", "6.1.193-1", "arm64")),
        "wheels": stamp(wheels=["fdt-0.3.4-py3-none-any.whl"]),
        "bytecode": stamp(bytecode=None),
    }
    for key, other in variants.items():
        assert image.stamp_changes(base, other) == [key]
    assert image.stamp_changes(None, base) == ["no image yet"]


def test_stamp_ignores_order_and_follows_the_init_script(monkeypatch):
    assert stamp(guest=list(reversed(GUEST))) == stamp()
    before = stamp()
    monkeypatch.setattr(image, "init_script", lambda: "#!/bin/busybox sh\necho changed\n")
    assert image.stamp_changes(before, stamp()) == ["init_sha256"]


def test_is_current_needs_the_same_stamp_and_both_files(fs):
    layout = Layout(Path("/c/testbed"))
    s = stamp()
    assert not image.is_current(layout, s)
    fs.create_file(layout.image_stamp, contents=json.dumps(s))
    fs.create_file(layout.kernel)
    assert not image.is_current(layout, s)           # no base.cpio
    fs.create_file(layout.base_cpio)
    assert image.is_current(layout, s)
    assert not image.is_current(layout, stamp(bytecode=None))
    layout.image_stamp.write_text("{broken")
    assert image.read_stamp(layout) is None and not image.is_current(layout, s)


def test_guest_python_version():
    assert image.guest_python_version(GUEST) == "3.11"
    with pytest.raises(TestbedError):
        image.guest_python_version([Deb("python3", "3.11.2-1", "arm64")])


def test_pack_rootfs_adds_the_console_device(fs):
    fs.create_file("/rootfs/init", contents="#!/bin/busybox sh\n", st_mode=stat.S_IFREG | 0o755)
    fs.create_dir("/rootfs/dev")
    fs.create_dir("/out")
    count = image.pack_rootfs(Path("/rootfs"), Path("/out/base.cpio"))
    [entries] = read_archives(Path("/out/base.cpio").read_bytes())
    by = {e.name: e for e in entries}
    assert count == len(entries) == 3
    assert stat.S_ISCHR(by["dev/console"].mode) and by["dev/console"].rdev == (5, 1)
    assert stat.S_IMODE(by["init"].mode) == 0o755
