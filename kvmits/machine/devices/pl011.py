"""A minimal Arm PL011 UART (PrimeCell UART, Arm DDI 0183): enough for Linux's amba-pl011
driver (earlycon and console) and for bare guest programs.

TX goes straight to a host byte stream, so the transmit FIFO is always empty (FR.TXFE = 1,
FR.BUSY = 0). RX comes from a queue the host feeds (feed()). Baud rate, line control and the
DMA register are plain storage. The interrupt is modelled as a level: TXRIS is set by each
transmitted byte (the FIFO drained at once) and cleared by UARTICR, RXRIS is set while received
bytes wait; the line is (RIS & IMSC) != 0, reported through the `irq` callback. Linux needs
the TX interrupt to push more than half a FIFO of tty output, and the RX one for input.

save_state()/load_state() carry the guest-visible state to another VM (issue 13, with
kvmits.machine.state): a snapshot or a migration resumes the guest's driver mid-conversation.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import BinaryIO

from kvmits.machine.saved_state import StateChecker

log = logging.getLogger(__name__)

# Register offsets (DDI 0183, 3.2 "Summary of registers")
UARTDR = 0x000
UARTRSR = 0x004          # UARTECR on write
UARTFR = 0x018
UARTILPR = 0x020
UARTIBRD = 0x024
UARTFBRD = 0x028
UARTLCR_H = 0x02C
UARTCR = 0x030
UARTIFLS = 0x034
UARTIMSC = 0x038
UARTRIS = 0x03C
UARTMIS = 0x040
UARTICR = 0x044
UARTDMACR = 0x048
UARTPeriphID0 = 0xFE0    # the TRM's names
UARTPCellID0 = 0xFF0

# UARTFR bits
FR_BUSY = 1 << 3
FR_RXFE = 1 << 4
FR_TXFF = 1 << 5
FR_RXFF = 1 << 6
FR_TXFE = 1 << 7
# interrupt bits (UARTIMSC / RIS / MIS / ICR)
INT_RX = 1 << 4
INT_TX = 1 << 5
INT_RT = 1 << 6
INT_ALL = 0x7FF

#: UARTPeriphID0..3 of a PL011 r1p5 (part 0x011, designer 0x41 = Arm, revision 3) and the
#: PrimeCell UARTPCellID0..3; Linux's AMBA bus reads them to bind the driver.
PERIPH_ID = (0x11, 0x10, 0x34, 0x00)
PCELL_ID = (0x0D, 0xF0, 0x05, 0xB1)

# storage registers: offset -> (reset value, writable mask)
_STORAGE = {
    UARTILPR: (0, 0xFF),
    UARTIBRD: (0, 0xFFFF),
    UARTFBRD: (0, 0x3F),
    UARTLCR_H: (0, 0xFF),
    UARTCR: (0x300, 0xFF87),     # reset: TXE | RXE
    UARTIFLS: (0x12, 0x3F),
    UARTDMACR: (0, 0x7),
}

#: how many received bytes wait before FR.RXFF reads 1 (the PL011's 16-entry FIFO depth)
RX_FIFO_DEPTH = 16

STATE_FORMAT = "kvmits-pl011"
STATE_VERSION = 1
#: the storage registers by the TRM's names (DDI 0183, 3.2), as a state dict keys them
_STORAGE_NAMES = {UARTILPR: "UARTILPR", UARTIBRD: "UARTIBRD", UARTFBRD: "UARTFBRD", UARTLCR_H: "UARTLCR_H",
                  UARTCR: "UARTCR", UARTIFLS: "UARTIFLS", UARTDMACR: "UARTDMACR"}
#: the RIS bits the model latches (TXRIS: DDI 0183, 3.3, UARTRIS); RXRIS is the queue's level, the
#: rest are never raised here, so a state claiming them is not one this model wrote
_LATCHED = INT_TX
#: the most unread RX bytes a state may carry. feed() does not bound the queue (the host side
#: is trusted), but a state may come from an edited file: 1 MiB is far beyond any console's
#: typeahead and still a bounded allocation
RX_STATE_MAX = 1 << 20
_STATE_KEYS = frozenset(("format", "version", "regs", "imsc", "ris", "rx", "tx_count", "bad_accesses"))


class Pl011:
    """The UART model. `out` receives every transmitted byte (flushed at once; None discards);
    `irq(level)` is called when the interrupt line changes (None: no interrupt wired)."""

    def __init__(self, out: BinaryIO | None = None, irq: Callable[[int], None] | None = None):
        self.out = out
        self.irq = irq
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self._regs = {off: reset for off, (reset, _mask) in _STORAGE.items()}
        self._imsc = 0
        self._ris = 0               # latched bits (TX); RX is computed from the queue
        self._line = 0
        #: bytes transmitted / guest accesses that were not to a register (counted, ignored)
        self.tx_count = 0
        self.bad_accesses = 0

    # -- host side -------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Queue bytes for the guest to receive (any thread)."""
        with self._lock:
            self._rx.extend(data)
            self._update_irq()

    def rx_pending(self) -> int:
        return len(self._rx)

    # -- save and restore (issue 13) -------------------------------------------------------------
    def save_state(self) -> dict:
        """The guest-visible state as a JSON-able dict: the storage registers (by the TRM's names),
        UARTIMSC, the latched RIS bits (TXRIS: RXRIS follows the queue), the RX queue's unread
        bytes (hex), and the host statistics tx_count and bad_accesses, which are carried so they
        count over the guest's whole life rather than restart at each restore. `out` and `irq`
        belong to the destination's construction. ValueError if more than RX_STATE_MAX bytes
        wait (load_state would refuse such a state)."""
        with self._lock:
            if len(self._rx) > RX_STATE_MAX:
                raise ValueError(f"PL011: {len(self._rx)} unread RX bytes, more than a state carries "
                                 f"({RX_STATE_MAX}): let the guest read them, or drop them, first")
            return {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "regs": {name: self._regs[off] for off, name in _STORAGE_NAMES.items()},
                "imsc": self._imsc,
                "ris": self._ris,
                "rx": bytes(self._rx).hex(),
                "tx_count": self.tx_count,
                "bad_accesses": self.bad_accesses,
            }

    def load_state(self, state: dict) -> None:
        """Apply a save_state() dict, on a freshly constructed device before any vCPU runs.

        The dict is not trusted (it may come from a file a user edited): every field is checked
        first (ValueError naming it; the device is left unchanged), then applied. The interrupt
        line is then recomputed from RIS & IMSC and reported through `irq` if asserted (this
        device's line starts low, like the destination's GIC input): an interrupt pending at
        save time is pending after restore, and the guest's handler finds the same MIS."""
        regs, imsc, ris, rx, tx_count, bad_accesses = _check_state(state)
        with self._lock:
            self._regs.update(regs)
            self._imsc = imsc
            self._ris = ris
            self._rx.clear()
            self._rx.extend(rx)
            self.tx_count = tx_count
            self.bad_accesses = bad_accesses
            self._update_irq()

    # -- interrupt state (call with the lock held) -----------------------------------------------
    def _raw_status(self) -> int:
        return self._ris | (INT_RX if self._rx else 0)

    def _update_irq(self) -> None:
        line = 1 if self._raw_status() & self._imsc else 0
        if line != self._line:
            self._line = line
            if self.irq is not None:
                self.irq(line)

    # -- the MMIO device interface --------------------------------------------------------------
    def mmio_read(self, vcpu: int, offset: int, size: int) -> int:
        reg = offset & ~3
        shift = (offset & 3) * 8
        with self._lock:
            if reg == UARTDR:
                value = self._rx.popleft() if self._rx else 0
                self._update_irq()
            elif reg == UARTFR:
                value = FR_TXFE | (FR_RXFE if not self._rx else 0) | (FR_RXFF if len(self._rx) >= RX_FIFO_DEPTH else 0)
            elif reg == UARTRSR:
                value = 0
            elif reg == UARTIMSC:
                value = self._imsc
            elif reg == UARTRIS:
                value = self._raw_status()
            elif reg == UARTMIS:
                value = self._raw_status() & self._imsc
            elif reg in self._regs:
                value = self._regs[reg]
            elif UARTPeriphID0 <= reg < UARTPeriphID0 + 16:
                value = PERIPH_ID[(reg - UARTPeriphID0) >> 2]
            elif UARTPCellID0 <= reg < UARTPCellID0 + 16:
                value = PCELL_ID[(reg - UARTPCellID0) >> 2]
            else:
                # UARTICR is write-only; everything else is reserved: reads as 0
                self.bad_accesses += reg != UARTICR
                value = 0
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def mmio_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        if offset & 3:
            self.bad_accesses += 1      # a sub-word write not at a register's start: ignored
            return
        with self._lock:
            if offset == UARTDR:
                self._transmit(value & 0xFF)
                self._ris |= INT_TX
            elif offset == UARTIMSC:
                self._imsc = value & INT_ALL
            elif offset == UARTICR:
                self._ris &= ~value     # RX is level: it clears when the queue is read empty
            elif offset == UARTRSR:
                pass                    # UARTECR: clears the error flags, which never get set here
            elif offset in self._regs:
                self._regs[offset] = value & _STORAGE[offset][1]
            else:
                self.bad_accesses += 1  # read-only or reserved: ignored
            self._update_irq()

    def _transmit(self, byte: int) -> None:
        self.tx_count += 1
        out = self.out
        if out is None:
            return
        try:
            out.write(bytes((byte,)))
            out.flush()
        except (OSError, ValueError) as exc:   # a closed or broken console must not kill the vCPU
            log.warning("PL011 console output failed (%s); discarding further output", exc)
            self.out = None


_CHECK = StateChecker("PL011", STATE_FORMAT, STATE_VERSION)


def _check_state(state) -> tuple[dict[int, int], int, int, bytes, int, int]:
    """Every field of a PL011 state, checked: (storage registers by offset, IMSC, RIS, RX bytes,
    tx_count, bad_accesses). ValueError naming the first bad field."""
    _CHECK.header(state, _STATE_KEYS)
    saved = state["regs"]
    if not isinstance(saved, dict):
        raise _CHECK.error(f"regs must be a dict, not {type(saved).__name__}")
    names = set(_STORAGE_NAMES.values())
    if saved.keys() != names:
        odd = sorted(map(str, saved.keys() ^ names))
        raise _CHECK.error(f"regs must hold exactly {sorted(names)} (wrong: {', '.join(odd)})")
    # a register holds only its writable bits (mmio_write masks with them; the resets fit too)
    regs = {off: _CHECK.int(saved[name], f"regs.{name}", 1 << 32, _STORAGE[off][1])
            for off, name in _STORAGE_NAMES.items()}
    imsc = _CHECK.int(state["imsc"], "imsc", 1 << 32, INT_ALL)
    ris = _CHECK.int(state["ris"], "ris", 1 << 32, _LATCHED)
    rx = _CHECK.hex(state["rx"], "rx", most=RX_STATE_MAX)
    tx_count = _CHECK.int(state["tx_count"], "tx_count", 1 << 64)
    bad_accesses = _CHECK.int(state["bad_accesses"], "bad_accesses", 1 << 64)
    return regs, imsc, ris, rx, tx_count, bad_accesses
