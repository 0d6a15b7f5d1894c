"""kvmits.machine on real arm64 KVM: raw guests on the PL011, PSCI SYSTEM_OFF/RESET, four vCPUs
brought up with PSCI CPU_ON, pause/resume around vGIC/ITS attribute access, the in-kernel ITS's
registers, MSI plumbing, a failing device model, and `kvmits run`.

The guest is a few A64 instructions, assembled with binutils-aarch64-linux-gnu and kept here as
words with their source beside them, so these tests need no guest build. Runs natively on an
arm64 KVM host, or on x86_64 in the testbed:
    tools/testbed run -- python3 -m pytest tests/arm64/test_machine.py -v
"""

from __future__ import annotations

import errno
import io
import os
import platform
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import arm64_kvm_unavailable_reason

from kvmits import uapi
from kvmits.errors import KvmError
from kvmits.gic.regs import GICR_TYPER
from kvmits.its.registers import GITS_CTLR, GITS_IIDR, GITS_TYPER

pytestmark = pytest.mark.arm64

TIMEOUT = 60.0           # the testbed runs KVM under TCG: generous, never a speed test
TEST_DEV = 0x0B00_0000   # nothing of the machine's map is there: a test device, or unclaimed
ROOT = Path(__file__).resolve().parents[2]

# One guest program for every test, chosen by registers the host sets after load(): its bytes
# are the same in every VM. (On the testbed, a second VM of the same process running *different*
# code at the same guest address sometimes ran the first VM's code: QEMU's translated-code cache
# under nested KVM. Same bytes, no such question.)
#   x19 = PSCI function to end with (0: SYSTEM_OFF), x24 = how many secondaries to start.
# It prints P_MSG, reads TEST_DEV (unclaimed unless a test maps a device there) and prints that
# value + '0'. With x24 = n it starts vCPUs 1..n with PSCI CPU_ON (context id = index; each reports
# it at TEST_DEV and sleeps in WFI), reports each CPU_ON result at TEST_DEV + 8, then sleeps in WFI
# until TEST_DEV + 0x10 reads non-zero. Then the PSCI call in x19.
PROGRAM = [
    0xAA0003F6,  # 00 mov  x22, x0                  ; keep the DTB address for the host to check
    0xD5384257,  # 04 mrs  x23, CurrentEL
    0xD2A12014,  # 08 movz x20, #0x0900, lsl #16    ; PL011
    0x10000441,  # 0c adr  x1, msg
    0x38401420,  # 10 1: ldrb w0, [x1], #1
    0x34000060,  # 14 cbz  w0, 2f
    0x39000280,  # 18 strb w0, [x20]                ; UARTDR
    0x17FFFFFD,  # 1c b    1b
    0xD2A16015,  # 20 2: movz x21, #0x0B00, lsl #16 ; TEST_DEV
    0xB94002A0,  # 24 ldr  w0, [x21]
    0x1100C000,  # 28 add  w0, w0, #'0'
    0x39000280,  # 2c strb w0, [x20]
    0xB40001F8,  # 30 cbz  x24, 6f
    0xD2800039,  # 34 mov  x25, #1
    0xD2800060,  # 38 3: movz x0, #0x0003
    0xF2B88000,  # 3c movk x0, #0xC400, lsl #16     ; PSCI_CPU_ON (SMC64) 0xC4000003
    0xAA1903E1,  # 40 mov  x1, x25                  ; target MPIDR: KVM's default, Aff0 = index
    0x10000202,  # 44 adr  x2, secondary
    0xAA1903E3,  # 48 mov  x3, x25                  ; context id -> the secondary's x0
    0xD4000002,  # 4c hvc  #0
    0xF90006A0,  # 50 str  x0, [x21, #8]
    0xEB18033F,  # 54 cmp  x25, x24
    0x91000739,  # 58 add  x25, x25, #1
    0x54FFFEE1,  # 5c b.ne 3b
    0xD503207F,  # 60 4: wfi                        ; a kick wakes it (KVM stepped past the WFI)
    0xF9400AA0,  # 64 ldr  x0, [x21, #0x10]
    0xB4FFFFC0,  # 68 cbz  x0, 4b
    0xD2800100,  # 6c 6: movz x0, #0x0008
    0xF2B08000,  # 70 movk x0, #0x8400, lsl #16     ; PSCI_SYSTEM_OFF 0x84000008
    0xB4000053,  # 74 cbz  x19, 5f
    0xAA1303E0,  # 78 mov  x0, x19
    0xD4000002,  # 7c 5: hvc #0
    0x14000000,  # 80 7: b 7b
    0xD2A16015,  # 84 secondary: movz x21, #0x0B00, lsl #16
    0xF90002A0,  # 88 str  x0, [x21]
    0xD503207F,  # 8c 8: wfi
    0x17FFFFFF,  # 90 b 8b
]
P_MSG = b"hello from kvmits\n"
IMAGE = struct.pack(f"<{len(PROGRAM)}I", *PROGRAM) + P_MSG + b"\0"
PSCI_SYSTEM_OFF = 0x8400_0008
PSCI_SYSTEM_RESET = 0x8400_0009


def start(m, *, end_with=0, secondaries=0):
    """load() the program, set its mode registers, start the vCPUs."""
    layout = m.load(IMAGE, kind="raw")
    m.vcpus[0].set_one_reg(uapi.arm64_core_reg("x19"), end_with)
    m.vcpus[0].set_one_reg(uapi.arm64_core_reg("x24"), secondaries)
    m.start()
    return layout


def _arm64_kvm_missing() -> str | None:
    return arm64_kvm_unavailable_reason()


@pytest.fixture
def machine():
    """machine(**config) -> a Machine (console in a BytesIO at .console), closed after the test."""
    reason = _arm64_kvm_missing()
    if reason:
        pytest.skip(reason)
    from kvmits.machine import Machine, MachineConfig

    made = []

    def make(**config):
        console = io.BytesIO()
        config.setdefault("mem_size", 16 << 20)
        m = Machine(MachineConfig(**config), console=console)
        m.console = console
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


class ReportDevice:
    """At TEST_DEV: offset 0 writes = a secondary came up (its context id), offset 8 writes =
    PSCI CPU_ON results, offset 0x10 reads = the host's "go"."""

    def __init__(self):
        self.online = []
        self.cpu_on_results = []
        self.go = 0
        self.cond = threading.Condition()

    def mmio_read(self, vcpu, offset, size):
        return self.go if offset == 0x10 else 0

    def mmio_write(self, vcpu, offset, size, value):
        with self.cond:
            if offset == 0:
                self.online.append((vcpu, value))
            elif offset == 8:
                self.cpu_on_results.append(value)
            self.cond.notify_all()

    def wait_online(self, n, timeout):
        """n secondaries reported, and the boot vCPU reported n CPU_ON results (a secondary can
        come up before the boot vCPU's CPU_ON call has returned and been reported)."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.online) >= n and len(self.cpu_on_results) >= n,
                                      timeout), (self.online, self.cpu_on_results)


@pytest.mark.parametrize("psci, reason, status", [(PSCI_SYSTEM_OFF, "poweroff", 0), (PSCI_SYSTEM_RESET, "reset", 3)],
                         ids=["system_off", "system_reset"])
def test_raw_guest_prints_and_ends_the_vm(machine, psci, reason, status):
    m = machine(cpus=1, its=None)
    layout = start(m, end_with=psci)
    assert layout.image.load_addr == 0x4008_0000 and layout.dtb_addr == 0x4020_0000
    result = m.wait(TIMEOUT)
    assert (result.reason, result.status, result.cpu) == (reason, status, 0)
    assert m.console.getvalue() == P_MSG + b"0"              # the unclaimed read gave 0
    assert m.bus.unclaimed_addresses() == {TEST_DEV}
    vcpu = m.vcpus[0]
    assert vcpu.get_one_reg(uapi.arm64_core_reg("x22")) == layout.dtb_addr       # x0 = device tree
    assert vcpu.get_one_reg(uapi.arm64_core_reg("x23")) == 1 << 2                 # CurrentEL: EL1
    assert m.ram.read(layout.dtb_addr, 4) == b"\xd0\x0d\xfe\xed"


def test_four_vcpus_cpu_on_pause_resume_and_the_its(machine):
    m = machine(cpus=4, its="kernel")
    dev = ReportDevice()
    m.add_device(TEST_DEV, 0x1000, dev, "test")
    start(m, secondaries=3)
    dev.wait_online(3, TIMEOUT)
    assert sorted(dev.online) == [(1, 1), (2, 2), (3, 3)]       # each on its own vCPU thread
    assert dev.cpu_on_results == [0, 0, 0]                      # PSCI SUCCESS

    # vCPUs asleep in WFI are inside KVM_RUN: the kernel refuses attribute access
    with pytest.raises(KvmError) as busy:
        m.its.device.get_reg(GITS_IIDR)
    assert busy.value.errno == errno.EBUSY

    pauses = []
    for _ in range(5):
        t0 = time.perf_counter()
        with m.paused(TIMEOUT):
            pauses.append(time.perf_counter() - t0)
            assert set(m.runner.states()) <= {"PARKED", "OUTSIDE"}
            iidr = m.its.device.get_reg(GITS_IIDR)
            typer = m.its.device.get_reg(GITS_TYPER)
            ctlr = m.its.device.get_reg(GITS_CTLR)
            gicr_typers = [m.gic.get_redist_reg64(mpidr, GICR_TYPER) for mpidr in m.mpidrs]
    print(f"\npause_all: {', '.join(f'{1e3 * t:.2f}' for t in pauses)} ms (4 vCPUs, 3 in WFI)")
    print(f"GITS_IIDR={iidr:#x} GITS_TYPER={typer:#x} GITS_CTLR={ctlr:#x} "
          f"GICR_TYPER={[hex(t) for t in gicr_typers]}")
    assert iidr & 0xFFF == 0x43B                                # Implementer: Arm
    assert typer & 1                                            # Physical LPIs
    assert ((typer >> 4) & 0xF) + 1 == 8                        # ITT entry size KVM uses
    assert ctlr & (1 << 31) and not ctlr & 1                    # Quiescent, not enabled by the guest
    for cpu, t in enumerate(gicr_typers):
        assert t & 1                                            # PLPIS: an ITS exists
        assert (t >> 8) & 0xFFFF == cpu                         # Processor_Number
        assert bool(t & (1 << 4)) == (cpu == 3)                 # Last
        assert t >> 32 == m.mpidrs[cpu] & 0xFFFFFF              # Affinity_Value

    # MSIs reach the in-kernel ITS; the guest has not enabled it, so KVM answers EBUSY
    assert m.vm.check_extension(uapi.KVM_CAP_MSI_DEVID) > 0
    with pytest.raises(KvmError) as msi:
        m.signal_msi(devid=1, eventid=0)
    assert msi.value.errno == errno.EBUSY
    efds = m.set_msi_routes({(1, 0): 1, (1, 1): 2})
    efds[(1, 0)].write(1)                                       # dropped by the disabled ITS, harmlessly

    dev.go = 1
    m.kick(0)
    result = m.wait(TIMEOUT)
    assert (result.reason, result.status, result.cpu) == ("poweroff", 0, 0)


def test_redistributors_show_lpis_only_with_an_its(machine):
    for its, plpis in ((None, 0), ("kernel", 1)):
        m = machine(cpus=2, its=its)
        # no thread runs yet: attribute access needs no pause
        assert [m.gic.get_redist_reg64(mpidr, GICR_TYPER) & 1 for mpidr in m.mpidrs] == [plpis, plpis]
        m.close()


def test_a_failing_device_model_stops_the_vm(machine):
    class Broken:
        def mmio_read(self, vcpu, offset, size):
            raise RuntimeError("device model bug")

        def mmio_write(self, vcpu, offset, size, value):
            pass

    m = machine(cpus=2, its=None)
    m.add_device(TEST_DEV, 0x1000, Broken())
    start(m)
    with pytest.raises(RuntimeError, match="device model bug"):
        m.wait(TIMEOUT)
    assert m.runner.states() == ["EXITED", "EXITED"]          # vCPU 1 (powered off) was kicked out too


def test_kvmits_run(tmp_path):
    reason = _arm64_kvm_missing()
    if reason:
        pytest.skip(reason)
    image = tmp_path / "p1.bin"
    image.write_bytes(IMAGE)                                   # x19 = x24 = 0: print, SYSTEM_OFF
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "kvmits", "run", str(image), "--cpus", "2", "--mem", "16M",
                          "--its", "none"], stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT * 2, check=False,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == P_MSG + b"0"


def _linux_image() -> Path | None:
    """An arm64 Linux Image to boot: $KVMITS_LINUX_IMAGE, else this host's own kernel if readable."""
    env = os.environ.get("KVMITS_LINUX_IMAGE")
    if env:
        return Path(env)
    own = Path("/boot") / f"vmlinuz-{platform.release()}"
    return own if os.access(own, os.R_OK) else None


def test_linux_boots_to_the_root_mount(machine):
    """A real kernel with the generated device tree: earlycon, PSCI, the GICv3 and its ITS, the
    second CPU through PSCI CPU_ON, the PL011 as console; with no root it panics, and panic=-1
    reboots through PSCI SYSTEM_RESET."""
    image = _linux_image()
    if image is None:
        pytest.skip("no arm64 Linux Image: set KVMITS_LINUX_IMAGE (Debian's vmlinuz works, gzip and all)")
    m = machine(cpus=2, its="kernel", mem_size=256 << 20)
    layout = m.load(image, cmdline="console=ttyAMA0 earlycon panic=-1")
    assert layout.image.kind == "linux"
    result = m.run(TIMEOUT * 5)
    out = m.console.getvalue().decode(errors="replace")
    assert (result.reason, result.status) == ("reset", 3), out[-2000:]
    for line in ("Machine model: kvmits virt", "earlycon: pl11 at MMIO 0x0000000009000000", "psci: PSCIv",
                 "GICv3: CPU1: found redistributor 1 region 0:0x00000000080c0000",
                 "ITS [mem 0x08080000-0x0809ffff]", "smp: Brought up 1 node, 2 CPUs",
                 "ttyAMA0 at MMIO 0x9000000", "Unable to mount root fs"):
        assert line in out, f"{line!r} not in the console output:\n{out[-3000:]}"
