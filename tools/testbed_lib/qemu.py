"""Booting the image: qemu-system-aarch64's command line, and one boot with a time limit.

The board is QEMU's `virt` with EL2 emulated (virtualization=on) and a GICv3, so Debian's
kernel starts at EL2 and brings up KVM with the real vGICv3 and ITS code. TCG is the only
accelerator an x86_64 host has for arm64.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .console import ConsoleFilter, Fault

MACHINE = "virt,virtualization=on,gic-version=3"
# pauth-impdef: QEMU's own pointer-authentication hash instead of the architected QARMA,
# which is slow to emulate: "max" alone runs the testbed about 2x slower.
CPU = "max,pauth-impdef=on"
# panic=-1: a guest panic reboots at once, and -no-reboot turns that into qemu exiting.
# quiet loglevel=5: only kernel warnings (level 4: a WARN_ON's "WARNING: CPU: ..." and its
# trace, which the fault scanner needs to see) and worse reach the console between our
# markers; loglevel=4 would stop at errors. An oops or panic raises the level itself.
BASE_APPEND = "console=ttyAMA0 panic=-1 quiet loglevel=5"
NVHE_APPEND = "kvm-arm.mode=nvhe"
# After the guest has reported its status it powers off; if qemu is still there after
# this long, it is stopped and the status stands.
POWEROFF_GRACE = 30.0
PR_SET_PDEATHSIG = 1  # prctl(2), include/uapi/linux/prctl.h
# How much of the console an error message quotes.
TAIL_LINES = 10
TAIL_CHARS = 4000
# After a guest kernel fault the run ends: once its trace is complete ("---[ end trace") and
# FAULT_LINGER more seconds passed (a panic may follow an oops), or after FAULT_QUIET seconds
# without console output, and at the latest FAULT_MAX_WAIT seconds after the fault.
FAULT_LINGER = 0.5
FAULT_QUIET = 2.0
FAULT_MAX_WAIT = 10.0


@dataclass
class BootConfig:
    smp: int = 2
    mem: int = 2048          # MiB
    cpu: str = CPU
    nvhe: bool = False       # KVM in nVHE mode (default: VHE, the kernel's choice at EL2)
    append: str = ""         # more kernel command line
    timeout: float = 1200.0  # seconds, boot to power-off
    quiet: bool = False      # show only the command's output


def kernel_cmdline(cfg: BootConfig, token: str) -> str:
    parts = [BASE_APPEND, f"kvmits.token={token}"]
    if cfg.nvhe:
        parts.append(NVHE_APPEND)
    if cfg.append:
        parts.append(cfg.append)
    return " ".join(parts)


def qemu_command(cfg: BootConfig, kernel: Path, initrd: Path, token: str,
                 qemu: str = "qemu-system-aarch64") -> list[str]:
    return [qemu,
            "-M", MACHINE, "-cpu", cfg.cpu, "-accel", "tcg",
            "-smp", str(cfg.smp), "-m", str(cfg.mem),
            "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", kernel_cmdline(cfg, token)]


@dataclass
class BootResult:
    status: int | None       # the guest command's exit status, None if never reported
    timed_out: bool
    qemu_status: int | None  # qemu's own exit status (None if we had to stop it)
    booted_after: float | None  # seconds from qemu start to the START marker
    seconds: float
    tail: list[str] = field(default_factory=list)  # last console lines, for error messages
    panic: str | None = None  # the guest kernel's panic message, if any
    fault: Fault | None = None  # the guest kernel's first fault (oops, BUG, panic, KVM WARNING)
    fault_after: float | None = None  # seconds from the fault to the end of the run


def boot(cmd: list[str], cfg: BootConfig, console: ConsoleFilter, out: TextIO | None,
         log: TextIO) -> BootResult:
    """Runs qemu, streaming its console to out (and all of it to log) until it exits, the
    time limit passes, or the guest reported its status and did not power off."""
    t0 = time.monotonic()
    deadline = t0 + cfg.timeout
    booted_after = None
    timed_out = False
    tail = ""
    # stdin /dev/null: with -nographic, qemu would otherwise read the terminal (Ctrl-A x...)
    # and put it in raw mode.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    fd = proc.stdout.fileno()
    # the log keeps everything, even when quiet, the RUNNING markers too
    raw_log = ConsoleFilter(console.token, hide_running=False)
    eof = False
    fault_at = complete_at = None
    last_data = t0
    try:
        while True:
            now = time.monotonic()
            if console.status is not None and deadline > now + POWEROFF_GRACE:
                deadline = now + POWEROFF_GRACE
            if console.fault is not None:
                if fault_at is None:
                    fault_at = now
                if console.fault.complete and complete_at is None:
                    complete_at = now
                end = min(fault_at + FAULT_MAX_WAIT, last_data + FAULT_QUIET,
                          complete_at + FAULT_LINGER if complete_at is not None else deadline)
                if now >= end:
                    break
                deadline = min(deadline, end)
            if now >= deadline:
                timed_out = console.status is None and console.fault is None
                break
            if not sel.select(timeout=min(1.0, deadline - now)):
                continue
            data = os.read(fd, 65536)
            if not data:
                eof = True
                break
            last_data = time.monotonic()
            shown = console.feed(data)
            if shown and out is not None:
                try:
                    out.write(shown)
                    out.flush()
                except BrokenPipeError:
                    out = None  # e.g. `| head`: the run goes on, the log keeps everything
            text = raw_log.feed(data)
            log.write(text)
            # flushed as it comes, so `tail -f` on the log shows a long run (and which test it
            # is in: the RUNNING markers are only in the log)
            log.flush()
            tail = (tail + text)[-TAIL_CHARS:]
            if booted_after is None and console.started:
                booted_after = time.monotonic() - t0
        for text, sink in ((console.finish(), out), (raw_log.finish(), log)):
            if text and sink is not None:
                try:
                    sink.write(text)
                    sink.flush()
                except BrokenPipeError:
                    pass
    finally:
        sel.close()
        qemu_status = _stop(proc, eof)
    end = time.monotonic()
    return BootResult(console.status, timed_out, qemu_status, booted_after,
                      end - t0, tail.splitlines()[-TAIL_LINES:], raw_log.panic, console.fault,
                      end - fault_at if fault_at is not None else None)


def _die_with_parent() -> None:
    """In the child before exec: a qemu whose testbed process was killed (even with SIGKILL,
    where no clean-up runs) is killed too, instead of running on unwatched."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the time limit and our own clean-up still apply


def _stop(proc: subprocess.Popen, eof: bool) -> int | None:
    """qemu's exit status if it ended by itself, None if it had to be stopped."""
    try:
        if eof:  # qemu closed its output: it is on its way out
            return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    finally:
        proc.stdout.close()
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return None
