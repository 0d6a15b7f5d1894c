"""The `kvmits` command line: one module per sub-command.

Each sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed arguments, returning the process exit status).
"""

import argparse
import importlib
import logging
import sys

# Sub-command modules, in the order `kvmits --help` lists them. Each must import: a broken one
# fails the whole command line loudly rather than vanish from --help.
SUBCOMMANDS = ("probe", "run", "test", "demo", "bench", "soak", "its", "vm", "trace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmits",
        description="arm64 KVM and the GICv3 ITS, in-kernel or in Python, from a script.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"kvmits.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    #: the command line as given (kvmits run hands it on to the testbed with its paths mapped)
    args.argv = argv
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
