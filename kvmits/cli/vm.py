"""`kvmits vm save|migrate --connect PATH`: a running `kvmits run --control PATH` saves its VM
to a snapshot file, or migrates it live into a new VM (of either ITS kind) in its own process.

    kvmits run guest.bin --agent --control /tmp/vm.sock &
    kvmits vm save /tmp/vm.snap --connect /tmp/vm.sock        # then: kvmits run --restore /tmp/vm.snap
    kvmits vm migrate --its user --connect /tmp/vm.sock       # prints the downtime

Exit status: 0 done; 1 the VM refused or the socket failed (the reason printed).
"""

from __future__ import annotations

import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("vm", help="save or live-migrate a VM that `kvmits run --control` serves",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="vm_command", metavar="ACTION", required=True)
    save = sub.add_parser("save", help="write the VM's state to a snapshot file (it keeps running)")
    save.add_argument("file", help="the snapshot file to write (resume it with `kvmits run --restore FILE`)")
    migrate = sub.add_parser("migrate", help="move the running guest into a new VM in the same process")
    migrate.add_argument("--its", choices=("kernel", "user"), help="the new VM's ITS (default: the same kind)")
    for q in (save, migrate):
        q.add_argument("--connect", required=True, metavar="PATH", help="the control socket of `kvmits run --control`")
        q.add_argument("--json", action="store_true", help="print the answer as JSON")
        q.set_defaults(func=run)


def run(args) -> int:
    from kvmits.machine.control import ControlError, request

    try:
        if args.vm_command == "save":
            # the VMM writes the file: give it a path that means the same from its directory
            result = request(args.connect, "save", file=os.path.abspath(args.file))
        else:
            result = request(args.connect, "migrate", **({} if args.its is None else {"its": args.its}))
    except ControlError as exc:
        print(f"kvmits vm {args.vm_command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.vm_command == "save":
        print(f"saved {result['path']}: {result['file_bytes']} bytes ({result['ram_pages_stored']} RAM pages stored, "
              f"{result['ram_pages_zero']} zero pages skipped) in {result['seconds']:.2f} s")
    else:
        print(f"migrated: {result['its'][0]} -> {result['its'][1]} ITS, downtime {result['downtime'] * 1000:.1f} ms "
              f"(capture {result['capture'] * 1000:.1f} ms, restore {result['restore'] * 1000:.1f} ms)")
    return 0
