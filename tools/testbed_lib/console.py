"""The guest's serial console as the host sees it, and the markers PID 1 prints on it.

The guest init prints (see image.init_script):

    KVMITS-TESTBED-START <token>            on a line of its own, before the command starts
    KVMITS-TESTBED-EXIT <token> <status>    when it has ended, with its exit status; on the
                                            command's last line if that had no newline

<token> is random per run and passed on the kernel command line, so a command that prints
something marker-like (or cats a log of an earlier run) cannot fake its own exit status.
The serial line turns "\\n" into "\\r\\n" (the tty's ONLCR); the carriage returns go.
"""

from __future__ import annotations

import codecs
import re
import secrets

START = "KVMITS-TESTBED-START"
EXIT = "KVMITS-TESTBED-EXIT"
PANIC = "Kernel panic - not syncing"


def new_token() -> str:
    return secrets.token_hex(8)


def start_line(token: str) -> str:
    return f"{START} {token}"


class ConsoleFilter:
    """Fed raw console bytes as they arrive; returns the text to show and notes the markers.

    Normally everything is shown as soon as it arrives (boot messages, markers and all),
    so progress output without a newline (pytest's dots) is not held back. With quiet=True
    only the command's own output is shown, whole lines at a time."""

    def __init__(self, token: str, quiet: bool = False):
        self.token = token
        self.quiet = quiet
        self.started = False
        self.status: int | None = None
        self.panic: str | None = None  # the guest kernel's panic line, if it panicked
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line = ""
        self._start = re.compile(re.escape(f"{START} {token}") + r"(?:\s|$)")
        self._exit = re.compile(re.escape(f"{EXIT} {token} ") + r"(\d+)")

    def feed(self, data: bytes, final: bool = False) -> str:
        text = self._decoder.decode(data, final).replace("\r", "")
        shown = [] if self.quiet else [text]
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
        """Notes a marker in the line; returns the part of it that is command output."""
        if self.panic is None and PANIC in line:
            self.panic = line.strip()
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
