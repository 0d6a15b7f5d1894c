"""`kvmits soak`: a Linux guest's verified block I/O with IRQ affinity churn, for minutes, per
ITS; fails (exit 1) on any I/O error, corrupt block, stalled or lost I/O (docs/soak.md).

On an arm64 KVM host it runs here. Elsewhere it runs itself inside the arm64 testbed
(tools/testbed), with a time limit for the whole soak, and reports what came back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from kvmits.bench import ITS_MODES
from kvmits.bench.soak import FORMAT, SoakConfig
from kvmits.cli.testbed import (SOURCE_ROOT, add_kernel_option, in_testbed, kernel_refused, needs_testbed,
                                testbed_command)

#: the start of the one line `--json -` prints: how the host finds the result in the testbed's output
JSON_PREFIX = f'{{"format": "{FORMAT}"'
DEFAULTS = SoakConfig()


def its_list(text: str) -> list[str]:
    """`--its kernel,user`: the ITS kinds in the order given, each once."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ITS_MODES]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(f"ITS kinds are {', '.join(ITS_MODES)} (comma-separated), not {text!r}")
    if len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"an ITS kind is given twice in {text!r}")
    return kinds


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value
    return parse


def _queue_depth(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 4096:                      # iogen's MAX_QD
        raise argparse.ArgumentTypeError(f"must be in 1..4096, not {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _progress(msg: str) -> None:
    print(f"kvmits soak: {msg}", file=sys.stderr, flush=True)


def config_of(args) -> SoakConfig:
    return SoakConfig(minutes=args.minutes, qd=args.qd, churn_hz=args.churn_hz, stall_s=args.stall_seconds)


def inner_argv(args) -> list[str]:
    """The same soak, for `python3 -m kvmits` in the testbed, its result as one JSON line."""
    return ["soak", "--its", ",".join(args.its), "--minutes", f"{args.minutes:g}", "--qd", str(args.qd),
            "--churn-hz", f"{args.churn_hz:g}", "--stall-seconds", f"{args.stall_seconds:g}", "--json", "-"]


def find_result(lines) -> dict | None:
    """The soak's result among the testbed's output lines (passed through to stderr otherwise)."""
    result = None
    for line in lines:
        text = line.rstrip("\r\n")
        if text.startswith(JSON_PREFIX):
            try:
                result = json.loads(text)
            except ValueError as exc:
                print(f"kvmits soak: the testbed's result line is not JSON ({exc})", file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)
    return result


def testbed_soak(args) -> tuple[dict | None, int]:
    """The soak in the arm64 testbed: (its result or None, the testbed's exit status)."""
    from kvmits.bench.soak import testbed_timeout

    cmd = testbed_command(inner_argv(args), args.kernel, testbed_timeout(config_of(args), len(args.its)))
    if cmd is None:
        print("kvmits soak needs arm64 KVM; on other hosts it runs in the testbed of a kvmits source tree "
              "(tools/testbed), which this installation does not have.", file=sys.stderr)
        return None, 2
    _progress("this is not arm64: running in the arm64 testbed (builds it on first use: a few minutes)")
    with subprocess.Popen(cmd, cwd=SOURCE_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          text=True, errors="replace") as proc:
        result = find_result(proc.stdout)
    return result, proc.returncode


def output(args, result: dict, emulated: bool) -> int:
    """Print and write the result as asked; the exit status (0 every run passed, 1 not)."""
    from kvmits.bench.soak import format_report

    result = dict(result, emulated=emulated)
    if args.json == "-":
        print(json.dumps(result), flush=True)
    else:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
        print(format_report(result, markdown=args.report, emulated=emulated))
    for run in result["runs"]:
        for why in run["failures"]:
            print(f"kvmits soak: {run['its']} ITS FAILED: {why}", file=sys.stderr)
    return 0 if result["ok"] else 1


def cmd_soak(args) -> int:
    refused = kernel_refused("soak", args)
    if refused is not None:
        return refused
    if needs_testbed():
        result, status = testbed_soak(args)
        if result is None:
            print(f"kvmits soak: the testbed run gave no result (tools/testbed exit status {status})", file=sys.stderr)
            return status or 2
        return output(args, result, emulated=True)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("kvmits soak: /dev/kvm is missing or not accessible: run `kvmits probe`", file=sys.stderr)
        return 2
    from kvmits.bench.soak import SoakSetupError, run_soak

    try:
        result = run_soak(args.its, config_of(args), _progress)
    except SoakSetupError as exc:
        print(f"kvmits soak: {exc}", file=sys.stderr)
        return 2
    return output(args, result, emulated=in_testbed())


def register(sub) -> None:
    p = sub.add_parser("soak", help="a Linux guest's verified block I/O with IRQ affinity churn for minutes, per ITS",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--its", type=its_list, default=list(ITS_MODES), metavar="KINDS",
                   help=f"the ITSes to soak, in turn, comma-separated (default: {','.join(ITS_MODES)})")
    p.add_argument("--minutes", type=_positive(float), default=DEFAULTS.minutes,
                   help="minutes of random reads and writes per ITS (default: %(default)s)")
    p.add_argument("--qd", type=_queue_depth, metavar="N", default=DEFAULTS.qd,
                   help="I/O queue depth, 1..4096 (default: %(default)s)")
    p.add_argument("--churn-hz", type=_non_negative, default=float(DEFAULTS.churn_hz),
                   help="moves of the disk's vector per second, 0 for none (default: %(default)s)")
    p.add_argument("--stall-seconds", type=_positive(float), default=DEFAULTS.stall_s,
                   help="an I/O outstanding longer is stalled, a failure (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH ('-': only the JSON, "
                                                  "on one line of stdout)")
    p.add_argument("--report", action="store_true", help="the summary as markdown (docs/soak.md's tables)")
    add_kernel_option(p)
    p.set_defaults(func=cmd_soak)
