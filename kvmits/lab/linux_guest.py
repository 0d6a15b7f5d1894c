"""The nested Linux guest: a real Linux kernel and a small initramfs that runs one shell script,
for testing kvmits' virtio devices against the kernel's own drivers.

A guest is a directory of three files, made from Debian packages by `tools/linux-guest` and
carried by the testbed into every run at /opt/kvmits/linux-guest:

- `Image`: the kernel, an uncompressed arm64 Image (what kvmits' loader boots);
- `initramfs.cpio`: busybox, the modules virtio_pci, virtio_blk and virtio_rng need, and /init;
- `release`: the kernel release, one line.

/init prints KVMITS-GUEST-INIT, mounts /proc, /sys and /dev, loads the modules (a line "KVMITS-GUEST-INSMOD-FAILED
<module>: <why>" for each that fails), prints KVMITS-GUEST-READY, runs `sh /job.sh` if the
initrd has one (its stdout and stderr on the console, stdin /dev/null), prints
"KVMITS-GUEST-DONE rc=<its status>" (rc=127 without a job), closes the console so that the
UART has sent everything, syncs and powers off (PSCI SYSTEM_OFF: the machine ends with reason
"poweroff").

    guest = LinuxGuest.find()                  # None: LinuxGuest.why_missing() says why
    console = io.BytesIO()
    m = Machine(MachineConfig(cpus=2, mem_size=256 << 20), console=console)
    m.load(guest.image, cmdline="console=ttyAMA0 quiet panic=-1",
           initrd=guest.initrd("dd if=/dev/vda bs=512 count=1 | od -c", files={"data/x": b"..."}))
    result = m.run(300)
    report = GuestReport.parse(console.getvalue()).check(result)   # raises, saying what went wrong
    print(report.output)

Pure: this module makes bytes and parses text; it boots nothing.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmits.errors import KvmitsError
from kvmits.newc import NewcWriter, parent_dirs

#: the directory of a guest to use instead of the testbed's
ENV = "KVMITS_LINUX_GUEST"
#: where tools/testbed puts the guest of the kernel it boots
TESTBED_DIR = "/opt/kvmits/linux-guest"
#: what tools/testbed puts there instead when the kernel can have no guest: the reason
TESTBED_MISSING = "/opt/kvmits/linux-guest.missing"
FILES = ("Image", "initramfs.cpio", "release")
#: the job's path in the guest
JOB = "job.sh"
# /init's console markers (tools/testbed_lib/linux_guest.py imports them for the /init it writes):
# INIT is /init's first word (userspace has started), READY follows the modules' insmod (their
# devices probed)
INIT = "KVMITS-GUEST-INIT"
READY = "KVMITS-GUEST-READY"
DONE = "KVMITS-GUEST-DONE"
INSMOD_FAILED = "KVMITS-GUEST-INSMOD-FAILED"
#: console lines quoted when something went wrong
TAIL_LINES = 15

_DONE = re.compile(re.escape(DONE) + r" rc=(\d+)")
_PANIC = re.compile(r"Kernel panic - not syncing: [^\n]*")


class LinuxGuestError(KvmitsError):
    """No usable guest where one was asked for, or a guest run that did not end as it should."""


@dataclass(frozen=True)
class LinuxGuest:
    directory: Path

    @property
    def image(self) -> Path:
        return self.directory / "Image"

    @property
    def initramfs(self) -> Path:
        return self.directory / "initramfs.cpio"

    @property
    def release(self) -> Path:
        return self.directory / "release"

    @property
    def kernel_release(self) -> str:
        """The release the guest's modules are for, e.g. '6.1.0-57-arm64'."""
        return self.release.read_text().strip()

    def missing(self) -> list[str]:
        return [name for name in FILES if not (self.directory / name).is_file()]

    @classmethod
    def find(cls, environ=os.environ) -> LinuxGuest | None:
        """The guest in $KVMITS_LINUX_GUEST (LinuxGuestError if that is not a whole guest), else
        the testbed's at /opt/kvmits/linux-guest, else None."""
        chosen = environ.get(ENV)
        if chosen:
            guest = cls(Path(chosen))
            if guest.missing():
                raise LinuxGuestError(f"${ENV}={chosen}: not a Linux guest directory, it lacks "
                                      f"{', '.join(guest.missing())} (tools/linux-guest -o DIR makes one)")
            return guest
        guest = cls(Path(TESTBED_DIR))
        return None if guest.missing() else guest

    @staticmethod
    def why_missing(environ=os.environ) -> str:
        """Why find() returned None, in words (for a test's skip)."""
        try:
            note = Path(TESTBED_MISSING).read_text().strip()
        except OSError:
            note = ""
        if note:
            return f"the testbed has no Linux guest for this kernel: {note}"
        return (f"no Linux guest: ${ENV} is not set and there is none at {TESTBED_DIR} (tools/testbed "
                f"carries one into every run; elsewhere make one with tools/linux-guest -o DIR and set "
                f"{ENV}=DIR)")

    def initrd(self, job: str, files: dict[str, bytes] | None = None) -> bytes:
        """The guest's initramfs followed by one more newc archive with /job.sh (and files)."""
        return self.initramfs.read_bytes() + job_archive(job, files)


def _archive_path(name: str) -> str:
    path = name.lstrip("/")
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a file path for the guest: {name!r}")
    return path


def job_archive(job: str, files: dict[str, bytes] | None = None) -> bytes:
    """A newc archive with /job.sh (the script, run by /init with `sh`) and files (guest path
    -> contents, mode 0755, missing parent directories made 0755)."""
    named = {_archive_path(k): v for k, v in (files or {}).items()}
    if JOB in named:
        raise ValueError(f"files must not hold /{JOB}: the job is given as the script")
    out = io.BytesIO()
    w = NewcWriter(out, mtime=0)
    for d in parent_dirs(named):
        w.add_dir(d)
    for name, data in named.items():
        w.add_file(name, bytes(data), 0o755)
    w.add_file(JOB, (job if job.endswith("\n") else job + "\n").encode(), 0o755)
    w.close()
    return out.getvalue()


@dataclass(frozen=True)
class GuestReport:
    """What a guest's console says: whether /init got to the job (ready), the job's exit status
    (rc, None if it never ended), its output (the text between READY and DONE)."""
    ready: bool
    rc: int | None
    output: str
    insmod_failures: tuple[str, ...]
    console: str

    @classmethod
    def parse(cls, console_text: str | bytes) -> GuestReport:
        if isinstance(console_text, bytes):
            console_text = console_text.decode("utf-8", "replace")
        text = console_text.replace("\r\n", "\n")   # the guest's tty adds a CR to every LF
        failures = tuple(line[line.index(INSMOD_FAILED) + len(INSMOD_FAILED):].strip()
                         for line in text.splitlines() if INSMOD_FAILED in line)
        at = text.find(READY)
        if at < 0:
            return cls(False, None, "", failures, text)
        newline = text.find("\n", at)
        start = len(text) if newline < 0 else newline + 1
        done = None
        for done in _DONE.finditer(text, start):
            pass   # the last one: /init prints it after everything the job printed
        if done is None:
            return cls(True, None, text[start:], failures, text)
        return cls(True, int(done.group(1)), text[start:done.start()], failures, text)

    @property
    def done(self) -> bool:
        return self.rc is not None

    def _tail(self) -> str:
        lines = self.console.rstrip("\n").splitlines()[-TAIL_LINES:]
        return "\n    ".join(lines) if lines else "(no console output at all)"

    def problem(self, exit=None) -> str | None:
        """None when the job ran to its end, else what went wrong, with the console's last lines.
        exit: the machine's MachineExit (or anything with reason and status), for the message."""
        ended = f"; the machine ended with {exit.reason!r} (status {exit.status})" if exit is not None else ""
        panic = _PANIC.search(self.console)
        panicked = f"; the kernel panicked: {panic.group(0)}" if panic else ""
        if self.insmod_failures:
            panicked += f"; modules that did not load: {'; '.join(self.insmod_failures)}"
        if not self.ready:
            return (f"the guest never printed {READY}: its kernel did not get to /init, or /init "
                    f"failed before it{panicked}{ended}. Last console lines:\n    {self._tail()}")
        if not self.done:
            return (f"the guest printed {READY} but not '{DONE} rc=N': the job did not finish "
                    f"(it hung or was stopped, or the kernel died){panicked}{ended}. Last console "
                    f"lines:\n    {self._tail()}")
        return None

    def check(self, exit=None, rc: int | None = 0) -> GuestReport:
        """self if every module loaded, the job ran to its end (with status rc, unless rc is
        None) and the machine (if given) powered off; else LinuxGuestError saying what went wrong."""
        problem = self.problem(exit)
        if problem is None and self.insmod_failures:
            problem = f"modules did not load: {'; '.join(self.insmod_failures)}"
        if problem is None and rc is not None and self.rc != rc:
            problem = (f"the job exited with status {self.rc}, not {rc}; its output:\n    "
                       + "\n    ".join(self.output.rstrip("\n").splitlines()[-TAIL_LINES:]))
        if problem is None and exit is not None and exit.reason != "poweroff":
            problem = (f"the job ended (rc={self.rc}) but the machine did not power off: it ended "
                       f"with {exit.reason!r} (status {exit.status})")
        if problem is not None:
            raise LinuxGuestError(problem)
        return self
