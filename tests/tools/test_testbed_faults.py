"""Guest kernel faults on the console: the scanner, the RUNNING markers, the end of the run and
the verdict. The kernel texts are written after arm64 kernels' real output (6.1 and 6.12)."""

import io
import sys
from pathlib import Path

import pytest

from testbed_lib import cli, qemu
from testbed_lib.console import EXIT, RUNNING, START, ConsoleFilter, FaultScanner
from testbed_lib.errors import EXIT_GUEST_KERNEL

TOKEN = "0123456789abcdef"

OOPS = """\
[  123.456789] Unable to handle kernel NULL pointer dereference at virtual address 0000000000000010
[  123.457001] Mem abort info:
[  123.457102]   ESR = 0x0000000096000006
[  123.457203]   EC = 0x25: DABT (current EL), IL = 32 bits
[  123.457506]   FSC = 0x06: level 2 translation fault
[  123.457607] Data abort info:
[  123.457708]   ISV = 0, ISS = 0x00000006, ISS2 = 0x00000000
[  123.458011] user pgtable: 4k pages, 48-bit VAs, pgdp=0000000043a1c000
[  123.458112] [0000000000000010] pgd=0800000043a2d003, p4d=0800000043a2d003, pud=0800000043a2e003, pmd=0000000000000000
[  123.458213] Internal error: Oops: 0000000096000006 [#1] PREEMPT SMP
[  123.458314] Modules linked in:
[  123.458415] CPU: 1 UID: 0 PID: 312 Comm: python3 Not tainted 6.12.95+deb12-arm64 #1  Debian 6.12.95-1~bpo12+1
[  123.458516] Hardware name: linux,dummy-virt (DT)
[  123.458617] pstate: 61400005 (nZCv daif +PAN -UAO -TCO +DIT -SSBS BTYPE=--)
[  123.458718] pc : vgic_its_save_tables_v0+0x1a4/0x300
[  123.458819] lr : vgic_its_save_tables_v0+0x17c/0x300
[  123.458920] sp : ffff80008285bb20
[  123.459021] x29: ffff80008285bb20 x28: ffff000003d1c000 x27: 0000000000000000
[  123.459122] Call trace:
[  123.459223]  vgic_its_save_tables_v0+0x1a4/0x300
[  123.459324]  vgic_its_ctrl+0x98/0x120
[  123.459425]  vgic_its_set_attr+0x160/0x3a0
[  123.459526]  kvm_device_ioctl+0xbc/0x120
[  123.459627]  __arm64_sys_ioctl+0xb0/0x100
[  123.459728]  invoke_syscall+0x50/0x120
[  123.459930]  do_el0_svc+0x24/0x38
[  123.460031]  el0_svc+0x34/0xf0
[  123.460233]  el0t_64_sync+0x1ac/0x1b0
[  123.460334] Code: f9400a61 b4000ae1 f9401e60 91004000 (f9400800)
[  123.460435] ---[ end trace 0000000000000000 ]---
"""

KVM_WARNING = """\
[   45.100000] ------------[ cut here ]------------
[   45.100100] WARNING: CPU: 0 PID: 287 at arch/arm64/kvm/vgic/vgic-its.c:1280 vgic_its_invall+0x5c/0x90
[   45.100200] Modules linked in:
[   45.100300] CPU: 0 PID: 287 Comm: python3 Not tainted 6.1.0-57-arm64 #1  Debian 6.1.192-3
[   45.100400] Hardware name: linux,dummy-virt (DT)
[   45.100500] pc : vgic_its_invall+0x5c/0x90
[   45.100600] lr : vgic_its_handle_command+0x2d8/0x5a0
[   45.100700] Call trace:
[   45.100800]  vgic_its_invall+0x5c/0x90
[   45.100900]  vgic_its_process_commands.part.0+0x98/0x170
[   45.101000]  vgic_mmio_write_its_cwriter+0x64/0x90
[   45.101100] ---[ end trace 0000000000000000 ]---
"""

# Not in KVM's code itself, but called from it: the trace says so.
WARNING_CALLED_FROM_KVM = """\
[   50.000000] ------------[ cut here ]------------
[   50.000100] WARNING: CPU: 1 PID: 300 at mm/page_alloc.c:4450 __alloc_pages+0x2c0/0x330
[   50.000200] Modules linked in: dummy
[   50.000300] CPU: 1 PID: 300 Comm: python3 Not tainted 6.12.118+deb13-arm64 #1  Debian 6.12.118-1
[   50.000400] pc : __alloc_pages+0x2c0/0x330
[   50.000500] Call trace:
[   50.000600]  __alloc_pages+0x2c0/0x330
[   50.000700]  __kmalloc_large_node+0x98/0x170
[   50.000800]  kvm_vgic_map_resources+0x54/0x1a0
[   50.000900]  kvm_arch_vcpu_run_pid_change+0x88/0x2c0
[   50.001000] ---[ end trace 0000000000000000 ]---
"""

# A WARNING of another subsystem: shown, but not a KVM fault, even with a kvm module loaded.
OTHER_WARNING = """\
[   60.000000] ------------[ cut here ]------------
[   60.000100] WARNING: CPU: 1 PID: 1 at drivers/base/dd.c:555 really_probe+0x3c4/0x3f0
[   60.000200] Modules linked in: kvm_arm_extra kvm
[   60.000300] CPU: 1 PID: 1 Comm: swapper/0 Not tainted 6.13.0 #3
[   60.000400] Call trace:
[   60.000500]  really_probe+0x3c4/0x3f0
[   60.000600]  __driver_probe_device+0x84/0x160
[   60.000700] ---[ end trace 0000000000000000 ]---
"""

SYSRQ_PANIC = """\
[    4.285700] sysrq: Trigger a crash
[    4.287894] Kernel panic - not syncing: sysrq triggered crash
[    4.288162] CPU: 0 PID: 100 Comm: sh Not tainted 6.1.0-57-arm64 #1  Debian 6.1.192-3
[    4.288437] Hardware name: linux,dummy-virt (DT)
[    4.288602] Call trace:
[    4.288745]  dump_backtrace+0xe4/0x140
[    4.290087]  panic+0x184/0x364
[    4.290219]  __handle_sysrq+0x90/0x19c
[    4.290279]  write_sysrq_trigger+0x7c/0xc8
[    4.291161] SMP: stopping secondary CPUs
[    4.291571] Kernel Offset: 0x2a683ea00000 from 0xffff800008000000
[    4.292025] Memory Limit: none
[    4.292291] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---
"""

BUG_SLEEPING = """\
[   77.000001] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:580
[   77.000002] in_atomic(): 1, irqs_disabled(): 128, non_block: 0, pid: 290, name: python3
[   77.000003] CPU: 1 PID: 290 Comm: python3 Not tainted 6.1.0-57-arm64 #1  Debian 6.1.192-3
[   77.000004] Call trace:
[   77.000005]  __might_resched+0x124/0x160
[   77.000006]  mutex_lock+0x24/0x80
[   77.000007]  vgic_its_save_tables_v0+0x30/0x300
"""

# printk.time=0 (or a kernel without CONFIG_PRINTK_TIME): the kernel's BUG still has its dump
BUG_UNTIMESTAMPED = """\
BUG: scheduling while atomic: python3/290/0x00000002
Modules linked in:
CPU: 1 PID: 290 Comm: python3 Not tainted 6.13.0 #3
Call trace:
 __schedule_bug+0x58/0x70
"""

USERSPACE = """\
WARNING: something is deprecated, use the other thing
BUG: the parser found a bug in the input on line 3
tests/arm64/test_x.py::test_warnings PASSED
=============================== warnings summary ===============================
WARNING: CPU: 0 PID: 12 at nowhere/else.c:1 not_kvm+0x0/0x4
  this is a program printing kernel-looking text about Oops and Call trace: things
---[ end trace 0000000000000000 ]---
"""


def scan(text: str) -> FaultScanner:
    s = FaultScanner()
    for line in text.splitlines():
        s.feed(line, running="tests/arm64/test_x.py::test_y", started=True)
    return s


def test_oops_with_where_it_happened():
    f = scan("hello from the command\n" + OOPS + "after\n").fault
    assert f.kind == "oops" and f.complete
    assert f.headline == "Unable to handle kernel NULL pointer dereference at virtual address 0000000000000010"
    assert f.summary == f.headline + " (pc : vgic_its_save_tables_v0+0x1a4/0x300)"
    assert f.lines[0].endswith("virtual address 0000000000000010")
    assert f.lines[-1].endswith("---[ end trace 0000000000000000 ]---")   # not "after"
    assert f.running == "tests/arm64/test_x.py::test_y" and f.started and f.status is None


def test_internal_error_alone_is_an_oops():
    f = scan("[    9.000000] Internal error: Oops - BUG: 00000000f2000800 [#1] PREEMPT SMP\n").fault
    assert f.kind == "oops" and not f.complete


@pytest.mark.parametrize("text, where", [(KVM_WARNING, "arch/arm64/kvm/vgic/vgic-its.c:1280"),
                                         (WARNING_CALLED_FROM_KVM, "mm/page_alloc.c:4450")])
def test_kvm_warnings_count(text, where):
    f = scan(text).fault
    assert f.kind == "KVM WARNING" and f.complete
    assert f.headline.startswith(f"WARNING: CPU: ") and where in f.headline
    assert "cut here" in f.lines[0]


def test_other_warnings_and_userspace_text_do_not_count():
    assert scan(OTHER_WARNING).fault is None
    assert scan(USERSPACE).fault is None
    # and after them a real one is still found
    assert scan(OTHER_WARNING + USERSPACE + KVM_WARNING).fault.kind == "KVM WARNING"


def test_a_warning_without_an_end_is_dropped_after_a_while():
    lines = "[   61.000000] WARNING: CPU: 0 PID: 1 at fs/x.c:1 f+0x0/0x4\n" + \
            "".join(f"[   61.{i:06d}] noise {i}\n" for i in range(200))
    assert scan(lines + KVM_WARNING).fault.headline.endswith("vgic_its_invall+0x5c/0x90")


def test_panic_and_bug():
    f = scan(SYSRQ_PANIC).fault
    assert f.kind == "panic" and f.complete
    assert f.headline == "Kernel panic - not syncing: sysrq triggered crash"
    assert f.lines[0].endswith("sysrq: Trigger a crash")
    assert scan(BUG_SLEEPING).fault.headline.startswith("BUG: sleeping function called")
    f = scan(BUG_UNTIMESTAMPED).fault
    assert f.kind == "BUG" and f.headline == "BUG: scheduling while atomic: python3/290/0x00000002"
    assert scan("[   1.100000] kernel BUG at arch/arm64/kvm/hyp/nvhe/mem_protect.c:101!\n").fault.kind == "BUG"


def test_a_kernel_message_in_the_middle_of_a_line():
    f = scan("tests/arm64/test_its.py ....[  12.345678] Unable to handle kernel paging request at "
             "virtual address ffff800081000000\n").fault
    assert f.headline == "Unable to handle kernel paging request at virtual address ffff800081000000"


def console_bytes(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def feed_all(f: ConsoleFilter, data: bytes, chunk: int) -> str:
    return "".join(f.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)) + f.finish()


PYTEST_RUN = (f"{START} {TOKEN}\n"
              f"{RUNNING} {TOKEN} tests/arm64/test_a.py::test_one\n"
              "tests/arm64/test_a.py ."
              f"{RUNNING} {TOKEN} tests/arm64/test_a.py::test_two\n"
              ".\n"
              f"{RUNNING} 1111111111111111 tests/forged.py::test_other\n"
              + OOPS)


def test_running_markers_are_hidden_and_name_the_faulting_test():
    for chunk in (1, 3, 7, 50, 10000):
        f = ConsoleFilter(TOKEN)
        shown = feed_all(f, console_bytes(PYTEST_RUN), chunk)
        assert f"{RUNNING} {TOKEN}" not in shown, chunk
        assert "\ntests/arm64/test_a.py ..\n" in shown
        assert f"{RUNNING} 1111111111111111 tests/forged.py::test_other" in shown  # not our token
        assert f.running == "tests/arm64/test_a.py::test_two"
        assert f.fault.running == "tests/arm64/test_a.py::test_two" and f.fault.complete


def test_the_log_keeps_the_running_markers():
    f = ConsoleFilter(TOKEN, hide_running=False)
    shown = feed_all(f, console_bytes(PYTEST_RUN), 5)
    assert f"{RUNNING} {TOKEN} tests/arm64/test_a.py::test_two" in shown
    assert f.running == "tests/arm64/test_a.py::test_two"


def test_quiet_output_keeps_the_progress_line_whole():
    f = ConsoleFilter(TOKEN, quiet=True)
    shown = feed_all(f, console_bytes(PYTEST_RUN), 4)
    assert shown.startswith("tests/arm64/test_a.py ..\n") and RUNNING + " " + TOKEN not in shown


def test_a_held_back_marker_start_is_shown_when_it_is_not_one():
    f = ConsoleFilter(TOKEN)
    assert f.feed(b"progress KVMITS-TEST") == "progress "
    assert f.feed(b"ING is not a marker\r\n") == "KVMITS-TESTING is not a marker\n"


def test_fault_before_the_command_and_after_its_exit():
    f = ConsoleFilter(TOKEN)
    feed_all(f, console_bytes(SYSRQ_PANIC), 100)
    assert not f.fault.started and f.fault.running is None
    f = ConsoleFilter(TOKEN)
    feed_all(f, console_bytes(f"{START} {TOKEN}\n{EXIT} {TOKEN} 0\n" + KVM_WARNING), 100)
    assert f.fault.started and f.fault.status == 0


# --- the run ends soon after a fault -------------------------------------------------------

def fake_qemu(script: str) -> list[str]:
    return [sys.executable, "-c", "import sys, time\nw = sys.stdout.write\n" + script]


def boot(script, timeout=60.0):
    out, log = io.StringIO(), io.StringIO()
    console = ConsoleFilter(TOKEN)
    res = qemu.boot(fake_qemu(script), qemu.BootConfig(timeout=timeout), console, out, log)
    return res, out.getvalue(), log.getvalue()


def test_a_complete_trace_ends_the_run_at_once():
    text = f"{START} {TOKEN}\n" + OOPS
    res, out, log = boot(f"w({text!r}); sys.stdout.flush(); time.sleep(60)")
    assert res.fault.complete and not res.timed_out and res.status is None
    assert res.seconds < 10 and res.fault_after < qemu.FAULT_LINGER + 2
    assert "---[ end trace" in out and "---[ end trace" in log


def test_an_unfinished_trace_ends_the_run_after_quiet(monkeypatch):
    monkeypatch.setattr(qemu, "FAULT_QUIET", 0.5)
    head = f"{START} {TOKEN}\n" + "".join(OOPS.splitlines(True)[:5])
    res, _, _ = boot(f"w({head!r}); sys.stdout.flush(); time.sleep(60)")
    assert res.fault is not None and not res.fault.complete and not res.timed_out
    assert 0.4 < res.fault_after < 5


def test_a_chatty_guest_after_a_fault_is_stopped_at_the_bound(monkeypatch):
    monkeypatch.setattr(qemu, "FAULT_MAX_WAIT", 1.0)
    head = f"{START} {TOKEN}\n" + "".join(OOPS.splitlines(True)[:5])
    res, _, _ = boot(f"w({head!r}); sys.stdout.flush()\n"
                     "while True:\n    w('[  200.000000] more\\n'); sys.stdout.flush(); time.sleep(0.1)")
    assert res.fault is not None and not res.fault.complete
    assert 0.9 < res.fault_after < 5 and res.seconds < 10


def test_verdict_and_failed_line_for_a_fault_in_a_test():
    f = ConsoleFilter(TOKEN)
    feed_all(f, console_bytes(PYTEST_RUN), 64)
    res = qemu.BootResult(status=None, timed_out=False, qemu_status=None, booted_after=3.0,
                          seconds=9.0, tail=[], fault=f.fault, fault_after=0.6)
    code, msg = cli.verdict_of(res, 1200, Path("/x.log"), "linux-image-6.12.95+deb12-arm64=6.12.95-1~bpo12+1 "
                               "(bookworm-backports)", ["python3", "-m", "pytest", "tests/arm64"])
    assert code == EXIT_GUEST_KERNEL == 123
    assert msg.startswith("guest kernel fault (oops) in test tests/arm64/test_a.py::test_two "
                          "(of python3 -m pytest tests/arm64): Unable to handle kernel NULL pointer")
    assert "run ended 0.6s after it" in msg and "bookworm-backports" in msg
    assert "\n    [  123.459223]  vgic_its_save_tables_v0+0x1a4/0x300\n" in msg and "/x.log" in msg
    assert cli.failed_line(res) == (
        "FAILED tests/arm64/test_a.py::test_two - guest kernel fault: Unable to handle kernel NULL "
        "pointer dereference at virtual address 0000000000000010 (pc : vgic_its_save_tables_v0+0x1a4/0x300)")


def test_verdict_for_a_fault_in_a_plain_command():
    f = ConsoleFilter(TOKEN)
    feed_all(f, console_bytes(f"{START} {TOKEN}\n" + SYSRQ_PANIC), 64)
    res = qemu.BootResult(status=None, timed_out=False, qemu_status=None, booted_after=3.0,
                          seconds=9.0, tail=[], fault=f.fault, fault_after=0.5)
    code, msg = cli.verdict_of(res, 1200, Path("/x.log"), None, ["sh", "-c", "echo c > /proc/sysrq-trigger"])
    assert code == 123
    assert msg.startswith("guest kernel fault (panic) while running sh -c 'echo c > /proc/sysrq-trigger': "
                          "Kernel panic - not syncing: sysrq triggered crash")
    assert cli.failed_line(res) is None
