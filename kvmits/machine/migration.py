"""Live migration in one process (issue 13): a running machine into a new VM, of either ITS kind.

    new, report = migrate(machine, its="user")     # machine is closed; new runs the guest on
    print(report["downtime"])                       # seconds from pause to the new VM's start

The steps: pause every vCPU and device thread of the source (for good: it never resumes), capture its state
(kvmits.machine.state), restore it into a new Machine (the ITS kind `its`, default the same),
close the source, start the new one. Guest RAM is not copied: the new VM adopts the source's
memory (a memory slot of its own over the same mapping, as QEMU's local migration with shared
memory does), so the downtime does not grow with the RAM size. With `path`, the state goes
through a snapshot file written there and read back, RAM and all, as `kvmits run --restore`
would read it. If capturing or restoring fails, the source resumes and nothing else changed.

The downtime is the guest's: from the pause to the new vCPUs' start. The guest does not see it
in its virtual counter (restored to the saved value), only in wall-clock time.
"""

from __future__ import annotations

import time

from kvmits.machine import state as machine_state
from kvmits.machine.snapshot import write_snapshot


def migrate(machine, its: str | None = None, *, path=None, console=None):
    """(the new, started Machine, a report: {"downtime", "capture", "restore" (seconds), "its":
    [source kind, destination kind], "snapshot": SnapshotInfo as a dict or None}). `console`:
    the new machine's console (default: the source's PL011 output stream)."""
    from kvmits.machine.machine import Machine

    console = machine.uart.out if console is None else console
    started = time.monotonic()
    machine.quiesce()
    try:
        saved = machine_state.capture(machine)
        captured = time.monotonic()
        info = None
        if path is None:
            new = Machine.restore(saved, its=its, console=console, ram=machine.ram)
        else:
            info = write_snapshot(path, saved.meta, saved.sections, saved.ram)
            new = Machine.restore(path, its=its, console=console)
    except BaseException:
        machine.unquiesce()
        raise
    restored = time.monotonic()
    source_kind = machine.config.its
    machine.uart.out = None               # the source's console is the new machine's now
    if path is None:
        machine.ram = None                # the new machine's now: closing the source keeps it
    machine.close()
    try:
        new.start()
    except BaseException:
        new.close()
        raise
    done = time.monotonic()
    report = {"downtime": done - started, "capture": captured - started, "restore": restored - captured,
              "its": [source_kind, new.config.its], "snapshot": None if info is None else info._asdict()}
    return new, report
