"""The guest's serial console as the host sees it, the markers printed on it, and the guest
kernel's faults (oops, BUG, panic, a WARNING in KVM) found in it.

The guest init prints (see image.init_script):

    KVMITS-TESTBED-START <token>            on a line of its own, before the command starts
    KVMITS-TESTBED-EXIT <token> <status>    when it has ended, with its exit status; on the
                                            command's last line if that had no newline

and pytest in the guest (the hook in tests/conftest.py) writes to /dev/console, at each
test's start,

    KVMITS-TESTBED-RUNNING <token> <nodeid> on a line of its own, or after the progress dots
                                            of the test before (they have no newline yet)

which the shown output leaves out (the log keeps it): it says which test a guest kernel
fault happened in.

<token> is random per run and passed on the kernel command line, so a command that prints
something marker-like (or cats a log of an earlier run) cannot fake its own exit status.
The serial line turns "\\n" into "\\r\\n" (the tty's ONLCR); the carriage returns go.
"""

from __future__ import annotations

import codecs
import re
import secrets
from dataclasses import dataclass, field

START = "KVMITS-TESTBED-START"
EXIT = "KVMITS-TESTBED-EXIT"
RUNNING = "KVMITS-TESTBED-RUNNING"
PANIC = "Kernel panic - not syncing"

# A printk line: "[   12.345678] " (CONFIG_PRINTK_TIME, on in Debian's kernels), maybe with the
# caller id of CONFIG_PRINTK_CALLER ("[  T123]"). Searched, not anchored: a kernel message
# can start in the middle of a line the command has not finished (pytest's dots).
_PRINTK = re.compile(r"\[\s*\d+\.\d{6}\](?:\[\s*[CT]\d+\])? ?")
# Faults whose first line is unmistakable, wherever it appears.
_FAULT = re.compile(r"Unable to handle kernel |Internal error: .*\[#\d+\]|"
                    r"Kernel panic - not syncing|kernel BUG at \S+|\bOops\b.*\[#\d+\]")
# "WARNING: CPU: 1 PID: 345 at arch/arm64/kvm/vgic/vgic-its.c:2100 vgic_its_save_tables_v0+0x1c/0x1b0"
# (kernel/panic.c, __warn).
_WARN_AT = re.compile(r"WARNING: CPU: \d+ PID: \d+ at (?P<loc>.+)")
# The header of dump_stack(): what confirms an untimestamped "BUG: " line as the kernel's.
_DUMP = re.compile(r"^CPU: \d+ (?:UID: \d+ )?PID: \d+ Comm: |^Call trace:")
# KVM in a WARNING's location, or in a frame of its trace: arch/arm64/kvm, virt/kvm, the vgic,
# a kvm_* or vgic_* symbol, or the kvm module.
_KVM_LOCATION = re.compile(r"arch/arm64/kvm/|virt/kvm/|vgic|kvm", re.IGNORECASE)
_KVM_FRAME = re.compile(r"\b\w*(?:kvm|vgic)\w*(?:\.\w+)*\+0x[0-9a-f]+/0x[0-9a-f]+|\[kvm\]")
_END = re.compile(r"---\[ end (?:trace|Kernel panic)")
_TRACE_PROLOGUE = re.compile(r"cut here|^sysrq: ")
# A candidate (a WARNING not yet known to be KVM's, an untimestamped BUG) is dropped after
# this many lines without the evidence; a fault's trace is quoted up to this many lines.
PENDING_LINES = 100
TRACE_LINES = 200


@dataclass
class Fault:
    """A fault of the guest kernel, as seen on the console."""
    kind: str          # "oops", "BUG", "panic" or "KVM WARNING"
    headline: str      # its first line, without the printk timestamp
    lines: list[str] = field(default_factory=list)  # the trace, as printed
    complete: bool = False   # its "---[ end trace" (or end Kernel panic) line was seen
    running: str | None = None   # the pytest node id running then, if any
    started: bool = False    # had the command started?
    status: int | None = None  # had it already reported its exit status?

    @property
    def summary(self) -> str:
        """The headline, and for an oops where it happened (the "pc : " line)."""
        pc = next((_message(line)[1] for line in self.lines
                   if _message(line)[1].startswith("pc : ")), None)
        return f"{self.headline} ({pc})" if pc and pc not in self.headline else self.headline


def _message(line: str) -> tuple[bool, str]:
    """(is it a timestamped printk line, the message without the timestamp)."""
    m = _PRINTK.search(line)
    return (True, line[m.end():].rstrip()) if m else (False, line.strip())


def _kind(message: str) -> str:
    if PANIC in message:
        return "panic"
    if message.startswith("BUG: ") or "kernel BUG at" in message:
        return "BUG"
    return "oops"


class FaultScanner:
    """Fed the console line by line; `fault` is set at the first guest kernel fault: an oops,
    "Unable to handle kernel", a panic, a BUG, or a WARNING from KVM. Userspace output that
    merely says "WARNING:" or "BUG:" does not count: a WARNING needs the kernel's form
    ("WARNING: CPU: n PID: n at ...", or a printk timestamp) and KVM in its location or
    trace; an untimestamped "BUG: " needs the kernel's stack dump after it."""

    def __init__(self):
        self.fault: Fault | None = None
        self._pending: Fault | None = None
        self._needs: str | None = None   # "kvm" or "dump": what confirms the pending one
        self._previous: str | None = None

    def feed(self, line: str, running: str | None = None, started: bool = False,
             status: int | None = None) -> None:
        if self.fault is not None:
            if not self.fault.complete:
                if len(self.fault.lines) < TRACE_LINES:
                    self.fault.lines.append(line)
                if _END.search(line):
                    self.fault.complete = True
            return
        previous, self._previous = self._previous, line
        printk, message = _message(line)
        context = dict(running=running, started=started, status=status)
        m = _FAULT.search(message)
        if m:
            headline = message[m.start():] if not printk else message
            lines = [previous] if previous and _TRACE_PROLOGUE.search(_message(previous)[1]) else []
            self._confirm(Fault(_kind(headline), headline, lines + [line], **context))
            return
        if self._pending is not None:
            self._pending.lines.append(line)
            evidence = (_DUMP.search(message) if self._needs == "dump"
                        else not message.startswith("Modules linked in:") and _KVM_FRAME.search(message))
            if evidence:
                self._confirm(self._pending)
            elif _END.search(message) or len(self._pending.lines) > PENDING_LINES:
                self._pending = None  # not a KVM WARNING, or not the kernel's BUG
            return
        w = _WARN_AT.search(message)
        if w or (printk and message.startswith("WARNING: ")):
            headline = message[w.start():] if w else message
            lines = [previous] if previous and "cut here" in previous else []
            warning = Fault("KVM WARNING", headline, lines + [line], **context)
            if w and _KVM_LOCATION.search(w.group("loc")):
                self._confirm(warning)
            else:
                self._pending, self._needs = warning, "kvm"
        elif message.startswith("BUG: "):
            bug = Fault("BUG", message, [line], **context)
            if printk:
                self._confirm(bug)
            else:
                self._pending, self._needs = bug, "dump"

    def _confirm(self, fault: Fault) -> None:
        self.fault, self._pending = fault, None
        fault.complete = any(_END.search(line) for line in fault.lines)


def new_token() -> str:
    return secrets.token_hex(8)


def start_line(token: str) -> str:
    return f"{START} {token}"


class ConsoleFilter:
    """Fed raw console bytes as they arrive; returns the text to show and notes the markers.

    Normally everything is shown as soon as it arrives (boot messages, markers and all),
    so progress output without a newline (pytest's dots) is not held back. With quiet=True
    only the command's own output is shown, whole lines at a time."""

    def __init__(self, token: str, quiet: bool = False, hide_running: bool = True):
        self.token = token
        self.quiet = quiet
        self.hide_running = hide_running  # False for the log, which keeps everything
        self.started = False
        self.status: int | None = None
        self.panic: str | None = None  # the guest kernel's panic line, if it panicked
        self.running: str | None = None  # the last KVMITS-TESTBED-RUNNING node id
        self.faults = FaultScanner()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line = ""
        self._held = ""  # text that may be the start of a RUNNING marker
        self._start = re.compile(re.escape(f"{START} {token}") + r"(?:\s|$)")
        self._exit = re.compile(re.escape(f"{EXIT} {token} ") + r"(\d+)")
        self._running = f"{RUNNING} {token} "

    @property
    def fault(self) -> Fault | None:
        return self.faults.fault

    def _take_running(self, text: str, final: bool) -> str:
        """text without the RUNNING markers (noted in self.running); a possible start of
        one at the end is held back until the next call."""
        buf, out = self._held + text, []
        self._held = ""
        while True:
            i = buf.find(self._running)
            if i < 0:
                break
            j = buf.find("\n", i)
            if j < 0:
                if final:  # cut off: what there is of the node id still names the test
                    self.running = buf[i + len(self._running):].strip() or self.running
                    buf = buf[:i]
                    break
                out.append(buf[:i])
                self._held = buf[i:]
                return "".join(out)
            out.append(buf[:i])
            self.running = buf[i + len(self._running):j].strip()
            buf = buf[j + 1:]
        if not final:
            # the longest end of buf that could begin a marker waits for more text
            for k in range(min(len(buf), len(self._running) - 1), 0, -1):
                if self._running.startswith(buf[-k:]):
                    self._held = buf[-k:]
                    buf = buf[:-k]
                    break
        out.append(buf)
        return "".join(out)

    def feed(self, data: bytes, final: bool = False) -> str:
        raw = self._decoder.decode(data, final).replace("\r", "")
        text = self._take_running(raw, final)
        shown = [] if self.quiet else [text if self.hide_running else raw]
        self._line += text
        *lines, self._line = self._line.split("\n")
        if final and self._line:
            lines.append(self._line)
            self._line = ""
        for line in lines:
            kept = self._scan(line)
            if self.quiet and kept is not None:
                shown.append(kept + "\n")
        return "".join(shown)

    def finish(self) -> str:
        return self.feed(b"", final=True)

    def _scan(self, line: str) -> str | None:
        """Notes a marker or a fault in the line; returns the part of it that is command output."""
        if self.panic is None and PANIC in line:
            self.panic = line.strip()
        self.faults.feed(line, self.running, self.started, self.status)
        if self.status is not None:
            return None
        m = self._exit.search(line)
        if m:
            self.status = int(m.group(1))
            # output that did not end with a newline shares the marker's line
            prefix = line[:m.start()]
            return prefix if (self.started and prefix) else None
        if not self.started:
            if self._start.search(line):
                self.started = True
            return None
        return line
