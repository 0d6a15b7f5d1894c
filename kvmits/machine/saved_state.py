"""Checks of a device's saved state (issue 13), shared by the device models' load_state().

A saved state is a JSON-able dict that may come from a file a user edited, so a device model
never trusts it: it checks every field first, with these helpers, and only then applies it.
Each check raises ValueError naming the device and the field ("PL011 state: regs.UARTCR ...");
the device is left unchanged. A state carries a format name and a version, so that a state of
another device, or of an older layout, is refused before any field is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


class StateChecker:
    """The checks for one device's state dicts; `owner` names it in every message ("PL011")."""

    def __init__(self, owner: str, fmt: str | None = None, version: int | None = None):
        self.owner = owner
        self.format = fmt
        self.version = version

    def error(self, text: str) -> ValueError:
        return ValueError(f"{self.owner} state: {text}")

    def header(self, state, keys: Iterable[str]) -> dict:
        """state itself, checked to be a dict of this device's format and version holding
        exactly `keys` (which include "format" and "version")."""
        if not isinstance(state, dict):
            raise ValueError(f"{self.owner} state must be a dict, not {type(state).__name__}")
        if state.get("format") != self.format:
            raise self.error(f"format {state.get('format')!r} is not {self.format!r}")
        if type(state.get("version")) is not int or state["version"] != self.version:
            raise self.error(f"version {state.get('version')!r}, this kvmits reads {self.version}")
        self.fields(state, keys, None)
        return state

    def fields(self, d, keys: Iterable[str], what: str | None) -> dict:
        """d, checked to be a dict holding exactly `keys`; `what` names it (None: the state)."""
        where = "" if what is None else f"{what}: "
        if not isinstance(d, dict):
            raise self.error(f"{what or 'the state'} must be a dict, not {type(d).__name__}")
        keys = frozenset(keys)
        missing = sorted(keys - d.keys())
        if missing:
            raise self.error(f"{where}field(s) {', '.join(missing)} missing")
        unknown = sorted(map(str, d.keys() - keys))
        if unknown:
            raise self.error(f"{where}unknown field(s) {', '.join(unknown)}")
        return d

    def int(self, value, what: str, limit: int, mask: int | None = None) -> int:
        """value, checked to be an int in [0, limit) with no bit outside `mask`."""
        if type(value) is not int:          # bool is an int, but no field of a state is one
            raise self.error(f"{what} must be an integer, not {value!r}")
        if not 0 <= value < limit:
            raise self.error(f"{what} = {value:#x} is out of range [0, {limit:#x})")
        if mask is not None and value & ~mask:
            raise self.error(f"{what} = {value:#x} sets bits outside {mask:#x}")
        return value

    def hex(self, value, what: str, size: int | None = None, most: int | None = None) -> bytes:
        """value, checked to be a string of hex digit pairs: exactly `size` bytes, or at most
        `most` (bounded before it is decoded: a state may come from an edited file)."""
        if not isinstance(value, str):
            raise self.error(f"{what} must be a string of hex digit pairs, not {type(value).__name__}")
        if most is not None and len(value) > 2 * most:
            raise self.error(f"{what} holds {len(value) // 2} bytes, more than {most}")
        if not _HEX.fullmatch(value):       # (bytes.fromhex alone would skip whitespace)
            raise self.error(f"{what} must be a string of hex digit pairs")
        if size is not None and len(value) != 2 * size:
            raise self.error(f"{what} must be {size} bytes, not {len(value) // 2}")
        return bytes.fromhex(value)

    def list(self, value, what: str, most: int, unit: str = "entries") -> list:
        """value, checked to be a list of at most `most` items."""
        if not isinstance(value, list):
            raise self.error(f"{what} must be a list, not {type(value).__name__}")
        if len(value) > most:
            raise self.error(f"{what} has {len(value)} {unit}, more than {most}")
        return value
