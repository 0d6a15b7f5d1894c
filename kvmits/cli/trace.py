"""`kvmits trace summarize FILE`: a `kvmits run --trace` file as counts per class and per phase
(docs/trace.md): GITS accesses by register, commands by type, vCPU stops and their time, Python
translations, device interrupts."""

from __future__ import annotations

import json
import sys


def cmd_summarize(args) -> int:
    from kvmits.machine.trace import TraceFormatError, format_summary, read_trace, summarize

    try:
        with open(args.file, encoding="utf-8") as f:
            header, events = read_trace(f)
    except OSError as exc:
        print(f"kvmits trace: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except TraceFormatError as exc:
        print(f"kvmits trace: {args.file}: {exc}", file=sys.stderr)
        return 2
    summary = summarize(header, events)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
    else:
        print(format_summary(summary))
    return 0


def register(sub) -> None:
    p = sub.add_parser("trace", help="read a `kvmits run --trace` file", description=__doc__.split("\n\n")[0])
    tsub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    s = tsub.add_parser("summarize", help="counts per class and per phase")
    s.add_argument("file", metavar="FILE", help="a trace written by kvmits run --trace")
    s.add_argument("--json", action="store_true", help="the summary as JSON")
    s.set_defaults(func=cmd_summarize)
