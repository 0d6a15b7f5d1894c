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


def test_bad_config_is_a_usage_error(capsys):
    assert main(["run", "g", "--mem", "3M"]) == 2
    assert "multiple of 2 MiB" in capsys.readouterr().err


@pytest.mark.skipif(platform.machine() in ("aarch64", "arm64"), reason="checks the message of a non-arm64 host")
def test_non_arm64_host_says_where_to_run(capsys, tmp_path):
    image = tmp_path / "g.bin"
    image.write_bytes(b"\0" * 16)
    assert main(["run", str(image)]) == 1
    err = capsys.readouterr().err
    assert "cannot create the VM" in err and "tools/testbed run" in err


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


def test_pci_devices_without_an_its_are_a_usage_error(capsys, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(512))
    assert main(["run", "g", "--its", "none", "--disk", str(disk)]) == 2
    assert "need an ITS" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run"], "an IMAGE to boot, or --restore FILE"),
    (["run", "g.bin", "--restore", "vm.snap"], "--restore takes the machine from the file"),
    (["run", "--restore", "vm.snap", "--rng"], "--restore takes the machine from the file"),
    (["run", "--restore", "vm.snap", "--its", "none"], "not --its none"),
    (["run", "--restore", "/nonexistent/vm.snap"], "/nonexistent/vm.snap: no such file"),
])
def test_restore_usage_errors_come_before_any_vm(argv, message, capsys):
    """--restore's mistakes are usage errors (2), named before KVM is touched (on this x86 host
    a VM would fail for another reason first)."""
    args = build_parser().parse_args(argv)
    assert args.func(args) == 2
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
