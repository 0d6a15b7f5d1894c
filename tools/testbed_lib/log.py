"""The testbed's own messages: on stderr, prefixed, so stdout carries only the guest console."""

import sys
import time

# what every message starts with: the command's name (tools/linux-guest sets its own)
PREFIX = "testbed"


def info(message: str) -> None:
    print(f"{PREFIX}: {message}", file=sys.stderr, flush=True)


def clock() -> float:
    return time.monotonic()


def since(t0: float) -> float:
    """Seconds since t0, a clock() reading."""
    return time.monotonic() - t0
