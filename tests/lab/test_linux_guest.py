"""kvmits.lab.linux_guest: the initrd for one job, finding the guest, and reading its console."""

import io
import stat
from collections import namedtuple

import pytest

from kvmits.lab import linux_guest
from kvmits.lab.linux_guest import GuestReport, LinuxGuest, LinuxGuestError
from kvmits.newc import NewcWriter

from ..tools.newc_reader import read_archives

Exit = namedtuple("Exit", "reason status")


def make_guest_dir(path, release="6.1.0-57-arm64"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "Image").write_bytes(b"kernel")
    buf = io.BytesIO()
    w = NewcWriter(buf, mtime=0)
    w.add_file("init", b"#!/bin/busybox sh\n", 0o755)
    w.close()
    (path / "initramfs.cpio").write_bytes(buf.getvalue())
    (path / "release").write_text(release + "\n")
    return LinuxGuest(path)


def test_the_initrd_is_the_initramfs_and_then_the_job(tmp_path):
    guest = make_guest_dir(tmp_path / "g")
    blob = guest.initrd("echo hello; exit 3", files={"/data/block.bin": b"\x01\x02", "x/y/z.sh": b"#!/bin/sh\n"})
    base = guest.initramfs.read_bytes()
    assert blob.startswith(base)
    archives = read_archives(blob)
    assert [e.name for e in archives[0]] == ["init"]
    job = {e.name: e for e in archives[1]}
    assert list(job) == ["data", "x", "x/y", "data/block.bin", "x/y/z.sh", "job.sh"]
    assert job["job.sh"].data == b"echo hello; exit 3\n"
    assert stat.S_IMODE(job["job.sh"].mode) == 0o755 and stat.S_ISREG(job["job.sh"].mode)
    assert job["data/block.bin"].data == b"\x01\x02"
    assert stat.S_ISDIR(job["x/y"].mode)
    assert guest.kernel_release == "6.1.0-57-arm64"


def test_a_job_without_files_and_bad_paths(tmp_path):
    guest = make_guest_dir(tmp_path / "g")
    [_, job] = read_archives(guest.initrd("true\n"))
    assert [(e.name, e.data) for e in job] == [("job.sh", b"true\n")]
    for bad in ("", "/", "a/../b", "a//b", "./x"):
        with pytest.raises(ValueError, match="not a file path"):
            guest.initrd("true", files={bad: b""})
    with pytest.raises(ValueError, match="job.sh"):
        guest.initrd("true", files={"/job.sh": b"exit 1"})


def test_find_prefers_the_environment_and_says_what_a_directory_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(linux_guest, "TESTBED_DIR", str(tmp_path / "opt"))
    assert LinuxGuest.find({}) is None
    testbed = make_guest_dir(tmp_path / "opt")
    assert LinuxGuest.find({}) == testbed
    mine = make_guest_dir(tmp_path / "mine")
    assert LinuxGuest.find({"KVMITS_LINUX_GUEST": str(mine.directory)}) == mine
    assert mine.image == mine.directory / "Image" and mine.initramfs.name == "initramfs.cpio"
    (mine.directory / "release").unlink()
    with pytest.raises(LinuxGuestError, match=r"KVMITS_LINUX_GUEST=.*lacks release"):
        LinuxGuest.find({"KVMITS_LINUX_GUEST": str(mine.directory)})


def test_why_missing_passes_on_the_testbeds_note(tmp_path, monkeypatch):
    monkeypatch.setattr(linux_guest, "TESTBED_MISSING", str(tmp_path / "missing"))
    assert "KVMITS_LINUX_GUEST" in LinuxGuest.why_missing({}) and "tools/linux-guest" in LinuxGuest.why_missing({})
    (tmp_path / "missing").write_text("a user Image without --modules DIR has no modules for it\n")
    assert LinuxGuest.why_missing({}) == ("the testbed has no Linux guest for this kernel: a user Image "
                                         "without --modules DIR has no modules for it")


BOOT = ("[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x000f0510]\r\n"
        "[    0.812000] Run /init as init process\r\n")


def test_a_job_that_ran():
    console = BOOT + "KVMITS-GUEST-READY\r\nhello\r\n  CPU0  CPU1\r\nKVMITS-GUEST-DONE rc=0\r\n"
    for text in (console, console.encode()):
        report = GuestReport.parse(text)
        assert report.ready and report.done and report.rc == 0
        assert report.output == "hello\n  CPU0  CPU1\n"
        assert report.problem() is None and report.insmod_failures == ()
        assert report.check(Exit("poweroff", 0)) is report


def test_output_without_a_final_newline_and_a_job_printing_the_marker():
    report = GuestReport.parse("KVMITS-GUEST-READY\nno newline")
    assert report.ready and report.rc is None and report.output == "no newline"
    report = GuestReport.parse("KVMITS-GUEST-READY\nabcKVMITS-GUEST-DONE rc=5\n")
    assert report.rc == 5 and report.output == "abc"
    # the job echoing a marker of its own: the last one is /init's
    report = GuestReport.parse("KVMITS-GUEST-READY\necho KVMITS-GUEST-DONE rc=0\nKVMITS-GUEST-DONE rc=2\n")
    assert report.rc == 2 and report.output == "echo KVMITS-GUEST-DONE rc=0\n"
    assert GuestReport.parse("KVMITS-GUEST-READY").output == ""


def test_no_ready_says_the_kernel_or_init_did_not_get_there():
    console = BOOT + "[    1.0] Kernel panic - not syncing: No working init found.\r\n"
    report = GuestReport.parse(console)
    assert not report.ready and report.rc is None and report.output == ""
    problem = report.problem(Exit("reset", 3))
    assert "never printed KVMITS-GUEST-READY" in problem
    assert "the kernel panicked: Kernel panic - not syncing: No working init found." in problem
    assert "ended with 'reset' (status 3)" in problem
    assert "Run /init as init process" in problem          # the console's last lines
    with pytest.raises(LinuxGuestError, match="never printed"):
        report.check()
    assert "no console output at all" in GuestReport.parse("").problem()


def test_ready_without_done_says_the_job_did_not_finish():
    report = GuestReport.parse("KVMITS-GUEST-READY\nstarting\n")
    assert report.ready and not report.done
    problem = report.problem(Exit("stopped", 124))
    assert "not 'KVMITS-GUEST-DONE rc=N'" in problem and "did not finish" in problem and "starting" in problem


def test_check_wants_the_status_the_modules_and_a_power_off():
    with pytest.raises(LinuxGuestError, match=r"exited with status 1, not 0; its output:\n    oops"):
        GuestReport.parse("KVMITS-GUEST-READY\noops\nKVMITS-GUEST-DONE rc=1\n").check()
    assert GuestReport.parse("KVMITS-GUEST-READY\nKVMITS-GUEST-DONE rc=1\n").check(rc=1).rc == 1
    assert GuestReport.parse("KVMITS-GUEST-READY\nKVMITS-GUEST-DONE rc=1\n").check(rc=None).rc == 1
    with pytest.raises(LinuxGuestError, match="did not power off: it ended with 'reset'"):
        GuestReport.parse("KVMITS-GUEST-READY\nKVMITS-GUEST-DONE rc=0\n").check(Exit("reset", 3))
    console = ("KVMITS-GUEST-INSMOD-FAILED virtio_blk: insmod: can't insert '/lib/modules/virtio_blk.ko': "
               "invalid module format\nKVMITS-GUEST-READY\nKVMITS-GUEST-DONE rc=0\n")
    report = GuestReport.parse(console)
    assert report.insmod_failures == ("virtio_blk: insmod: can't insert '/lib/modules/virtio_blk.ko': "
                                      "invalid module format",)
    with pytest.raises(LinuxGuestError, match="modules did not load: virtio_blk: insmod"):
        report.check()
