"""The nested Linux guest boots on kvmits and runs a job (arm64 KVM: natively, or in the testbed,
which carries the guest of the kernel it boots at /opt/kvmits/linux-guest).

Its virtio modules load whether or not the machine has virtio devices; with none, they find
nothing, which is fine here: this is the smoke test of the guest itself."""

import io
import time

import pytest

from kvmits.lab.linux_guest import GuestReport, LinuxGuest

pytestmark = pytest.mark.arm64

#: boot to the job and back; the testbed runs the nested guest under TCG: generous
TIMEOUT = 600.0
CMDLINE = "console=ttyAMA0 quiet panic=-1"


@pytest.fixture(scope="module")
def guest(arm64_kvm):
    found = LinuxGuest.find()
    if found is None:
        pytest.skip(LinuxGuest.why_missing())
    return found


def test_the_guest_runs_a_job_and_powers_off(guest):
    from kvmits.machine import Machine, MachineConfig

    console = io.BytesIO()
    with Machine(MachineConfig(cpus=2, mem_size=256 << 20, its="kernel"), console=console) as m:
        m.load(guest.image, cmdline=CMDLINE, initrd=guest.initrd("echo hello; cat /proc/interrupts | head -5"))
        t0 = time.monotonic()
        try:
            result = m.run(TIMEOUT)
        except TimeoutError:
            report = GuestReport.parse(console.getvalue())
            pytest.fail(f"still running after {TIMEOUT:.0f}s: "
                        + (report.problem() or "the job ended, but the machine did not power off"))
        seconds = time.monotonic() - t0
    report = GuestReport.parse(console.getvalue())
    print(f"\nnested Linux {guest.kernel_release}: {seconds:.1f}s from start to power-off "
          f"({len(console.getvalue())} console bytes)\n{report.output}")
    report.check(result)
    assert (result.reason, report.rc) == ("poweroff", 0)
    assert "hello" in report.output
    assert "CPU0" in report.output   # /proc/interrupts' header: the job's commands ran
