"""`kvmits run`: its command line, and what it says on a host that cannot run arm64 guests."""

import argparse
import platform

import pytest

from kvmits.cli import build_parser, main
from kvmits.cli.run import parse_size


@pytest.mark.parametrize("text, size", [("256M", 256 << 20), ("1G", 1 << 30), ("65536", 65536), ("512KiB", 512 << 10),
                                        ("2m", 2 << 20), ("1T", 1 << 40)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "12X", "M", "-1M", "1.5G"])
def test_bad_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_options():
    args = build_parser().parse_args(["run", "guest.bin", "--cpus", "4", "--mem", "256M", "--append", "quiet",
                                      "--initrd", "rd.cpio", "--its", "none", "--kind", "raw", "--timeout", "5"])
    assert (args.image, args.cpus, args.mem, args.append, args.initrd, args.its, args.kind, args.timeout) == (
        "guest.bin", 4, 256 << 20, "quiet", "rd.cpio", "none", "raw", 5.0)
    defaults = build_parser().parse_args(["run", "g"])
    # unset, so that --restore can tell "as saved" from an explicit value (booting: 1, 128M, kernel)
    assert (defaults.cpus, defaults.mem, defaults.its, defaults.kind, defaults.append, defaults.restore) == (
        None, None, None, "auto", "console=ttyAMA0 earlycon", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "g", "--its", "hidden"])


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "g.bin"
    path.write_bytes(b"\0" * 16)
    return str(path)


def test_bad_config_is_a_usage_error(capsys, image):
    assert main(["run", image, "--mem", "3M"]) == 2
    assert "multiple of 2 MiB" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--mem", "3M"], ["--its", "none", "--rng"], ["--kind", "linux"]])
def test_a_missing_image_is_named_first(capsys, tmp_path, extra):
    """Before the configuration, the kind or the host are looked at."""
    missing = str(tmp_path / "nowhere.bin")
    assert main(["run", missing, *extra]) == 2
    assert capsys.readouterr().err.strip() == f"kvmits run: {missing}: no such file (the image)"


def test_a_missing_initrd_or_snapshot_is_named(capsys, tmp_path, image):
    assert main(["run", image, "--initrd", str(tmp_path / "no.cpio")]) == 2
    assert f"{tmp_path / 'no.cpio'}: no such file (the --initrd)" in capsys.readouterr().err
    assert main(["run", "--restore", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a file (the --restore)" in capsys.readouterr().err


def test_an_unreadable_image_is_named_first(capsys, image, monkeypatch):
    # (as root every file is readable: the check is os.access, made to say no here)
    import os
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == image else real(p, mode))
    assert main(["run", image, "--mem", "3M"]) == 2
    assert capsys.readouterr().err.strip() == f"kvmits run: {image}: not readable (the image)"


@pytest.mark.skipif(platform.machine() in ("aarch64", "arm64"), reason="the host-side check of a non-arm64 host")
def test_an_image_of_the_wrong_kind_is_refused_before_the_testbed(capsys, image, monkeypatch):
    import subprocess
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("the testbed was started"))
    assert main(["run", image, "--kind", "linux"]) == 2
    assert 'not an arm64 Linux Image: no "ARM\\x64" magic' in capsys.readouterr().err


@pytest.mark.skipif(platform.machine() in ("aarch64", "arm64"), reason="a non-arm64 host goes to the testbed")
def test_a_non_arm64_host_runs_the_same_command_in_the_testbed_with_its_files(capsys, tmp_path, image, monkeypatch):
    import subprocess
    from kvmits.cli.testbed import guest_path

    disk, initrd = tmp_path / "d.img", tmp_path / "i.cpio"
    disk.write_bytes(bytes(4096))
    initrd.write_bytes(b"x")
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **k: calls.append(cmd) or 3)
    assert main(["run", image, "--cpus", "2", f"--initrd={initrd}", "--disk", f"{disk},ro", "--timeout", "9"]) == 3
    (cmd,) = calls
    carried = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--file"]
    assert carried == [image, str(initrd), str(disk)]
    inner = cmd[cmd.index("--") + 1:]
    assert inner == ["python3", "-m", "kvmits", "run", guest_path(image), "--cpus", "2",
                     f"--initrd={guest_path(str(initrd))}", "--disk", f"{guest_path(str(disk))},ro", "--timeout", "9"]
    assert "running in the arm64 testbed" in capsys.readouterr().err


@pytest.mark.skipif(platform.machine() in ("aarch64", "arm64"), reason="a non-arm64 host goes to the testbed")
@pytest.mark.parametrize("extra", [["--control", "/tmp/s"], ["--trace", "all"]])
def test_what_cannot_come_back_from_the_testbed_is_refused(capsys, image, extra, monkeypatch):
    import subprocess
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("the testbed was started"))
    assert main(["run", image, *extra]) == 2
    assert "cannot reach this host" in capsys.readouterr().err


def test_disks_and_rng(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b,c.img"
    a.write_bytes(bytes(4096))
    b.write_bytes(bytes(4096))
    args = build_parser().parse_args(["run", "g", "--disk", str(a), "--disk", f"{b},ro", "--rng"])
    assert [(d.path, d.readonly) for d in args.disk] == [(str(a), False), (str(b), True)]
    assert args.rng
    defaults = build_parser().parse_args(["run", "g"])
    assert (defaults.disk, defaults.rng) == ([], False)


def test_a_disk_that_is_no_file_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", "g", "--disk", str(tmp_path / "missing.img")])
    assert info.value.code == 2
    assert "is not a file" in capsys.readouterr().err


def test_pci_devices_without_an_its_are_a_usage_error(capsys, tmp_path, image):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(512))
    assert main(["run", image, "--its", "none", "--disk", str(disk)]) == 2
    assert "need an ITS" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run"], "an IMAGE to boot, or --restore FILE"),
    (["run", "g.bin", "--restore", "vm.snap"], "--restore takes the machine from the file"),
    (["run", "--restore", "vm.snap", "--rng"], "--restore takes the machine from the file"),
    (["run", "--restore", "vm.snap", "--its", "none"], "not --its none"),
    (["run", "--restore", "/nonexistent/vm.snap"], "/nonexistent/vm.snap: no such file"),
])
def test_restore_usage_errors_come_before_any_vm(argv, message, capsys, tmp_path, monkeypatch):
    """--restore's mistakes are usage errors (2), named before KVM or the testbed is touched."""
    import subprocess
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.bin").write_bytes(b"\0" * 16)
    (tmp_path / "vm.snap").write_bytes(b"not a snapshot")
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("the testbed was started"))
    monkeypatch.setattr("kvmits.cli.testbed.needs_testbed", lambda: False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


class _FakeMachine:
    def __init__(self):
        import threading
        self.failed = threading.Event()
        self.error = None
        self.fed = []
        self.uart = self

    def fail(self, error):
        self.error = error
        self.failed.set()

    def feed(self, data):
        self.fed.append(data)


class _FailingSession:
    def __init__(self, machine):
        self.machine = machine
        self.calls = []

    def migrate(self, its):
        self.calls.append(its)
        raise AttributeError("a device has no save_state")


def test_a_failed_migrate_on_migration_ends_the_vm_with_the_failure():
    """--migrate-on: a migration that fails ends the run (exit 1 with the error) rather than
    leaving a guest that waits for --then-send's key to wait out --timeout."""
    import io
    import re

    from kvmits.cli.run import _ConsoleWatch

    machine = _FakeMachine()
    session = _FailingSession(machine)
    out = io.BytesIO()
    watch = _ConsoleWatch(out, [session], re.compile("^MIGRATE-NOW"), "user", "go\\n")
    watch.write(b"booting\nMIGRATE-NOW please\n")
    assert machine.failed.wait(10)
    assert session.calls == ["user"]
    assert isinstance(machine.error, AttributeError)
    assert "--migrate-on migration to the user ITS" in " ".join(machine.error.__notes__)
    assert machine.fed == []                      # the key is not sent: nothing migrated
    assert out.getvalue() == b"booting\nMIGRATE-NOW please\n"
