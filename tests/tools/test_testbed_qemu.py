import io
import sys

from testbed_lib import qemu
from testbed_lib.console import EXIT, START, ConsoleFilter

TOKEN = "feedfacecafebeef"


def test_qemu_command_line():
    cfg = qemu.BootConfig()
    cmd = qemu.qemu_command(cfg, "/k/vmlinuz", "/r/initrd", TOKEN)
    joined = " ".join(cmd)
    assert cmd[0] == "qemu-system-aarch64"
    assert "-M virt,virtualization=on,gic-version=3" in joined
    assert "-cpu max,pauth-impdef=on" in joined and "-accel tcg" in joined
    assert "-smp 2" in joined and "-m 2048" in joined
    for flag in ("-nographic", "-no-reboot"):
        assert flag in cmd
    assert cmd[cmd.index("-nic") + 1] == "none"
    assert cmd[cmd.index("-kernel") + 1] == "/k/vmlinuz" and cmd[cmd.index("-initrd") + 1] == "/r/initrd"
    append = cmd[cmd.index("-append") + 1].split()
    assert "console=ttyAMA0" in append and "panic=-1" in append
    assert f"kvmits.token={TOKEN}" in append and "kvm-arm.mode=nvhe" not in append


def test_nvhe_and_extra_append():
    line = qemu.kernel_cmdline(qemu.BootConfig(nvhe=True, append="a=1 b"), TOKEN).split()
    assert line[-3:] == ["kvm-arm.mode=nvhe", "a=1", "b"]


def fake_qemu(script: str) -> list[str]:
    """A stand-in for qemu: a Python process writing to the 'console' (its stdout)."""
    return [sys.executable, "-c", "import sys, time\nw = sys.stdout.write\n" + script]


def boot(script, timeout=20.0, quiet=False):
    out, log = io.StringIO(), io.StringIO()
    console = ConsoleFilter(TOKEN, quiet=quiet)
    res = qemu.boot(fake_qemu(script), qemu.BootConfig(timeout=timeout), console, out, log)
    return res, out.getvalue(), log.getvalue()


def test_boot_reports_the_guest_status_and_streams_everything():
    res, out, log = boot(f"w('noise\\r\\n{START} {TOKEN}\\r\\nhello\\r\\n'); sys.stdout.flush()\n"
                         f"w('{EXIT} {TOKEN} 9\\r\\n')")
    assert res.status == 9 and not res.timed_out and res.qemu_status == 0
    assert res.booted_after is not None and res.booted_after <= res.seconds
    assert out == log == f"noise\n{START} {TOKEN}\nhello\n{EXIT} {TOKEN} 9\n"


def test_quiet_boot_shows_the_output_but_logs_everything():
    res, out, log = boot(f"w('noise\\n{START} {TOKEN}\\nhello\\n{EXIT} {TOKEN} 0\\n')", quiet=True)
    assert res.status == 0 and out == "hello\n" and "noise" in log


def test_boot_without_marker():
    res, out, _ = boot("w('[ 1.0] Kernel panic - not syncing: nothing\\n'); sys.exit(0)")
    assert res.status is None and not res.timed_out
    assert res.panic == "[ 1.0] Kernel panic - not syncing: nothing"
    assert res.tail == ["[ 1.0] Kernel panic - not syncing: nothing"]


def test_time_limit_stops_the_process():
    res, out, _ = boot(f"w('{START} {TOKEN}\\n'); sys.stdout.flush(); time.sleep(60)", timeout=0.5)
    assert res.timed_out and res.status is None and res.qemu_status is None
    assert res.seconds < 10


def test_status_stands_when_the_guest_does_not_power_off(monkeypatch):
    monkeypatch.setattr(qemu, "POWEROFF_GRACE", 0.3)
    res, _, _ = boot(f"w('{START} {TOKEN}\\n{EXIT} {TOKEN} 0\\n'); sys.stdout.flush(); time.sleep(60)")
    assert res.status == 0 and not res.timed_out and res.qemu_status is None
    assert res.seconds < 10


class ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_does_not_stop_the_run():
    log = io.StringIO()
    console = ConsoleFilter(TOKEN)
    res = qemu.boot(fake_qemu(f"w('{START} {TOKEN}\\nlots\\n'); sys.stdout.flush(); time.sleep(0.1)\n"
                              f"w('{EXIT} {TOKEN} 5\\n')"), qemu.BootConfig(timeout=20), console, ClosedPipe(), log)
    assert res.status == 5 and "lots" in log.getvalue()
