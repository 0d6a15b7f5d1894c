"""The PL011 model: registers Linux's amba-pl011 driver and bare guests use."""

import io

from kvmits.machine.devices import pl011 as P


def make():
    out = io.BytesIO()
    lines = []
    return P.Pl011(out, irq=lines.append), out, lines


def test_tx_goes_to_the_console():
    uart, out, _ = make()
    for ch in b"hi\n":
        uart.mmio_write(0, P.UARTDR, 4, ch | 0x100)    # only the low byte is data
    uart.mmio_write(0, P.UARTDR, 1, ord("!"))
    assert out.getvalue() == b"hi\n!"
    assert uart.tx_count == 4


def test_flags_tx_always_empty_rx_follows_the_queue():
    uart, _, _ = make()
    fr = uart.mmio_read(0, P.UARTFR, 4)
    assert fr & P.FR_TXFE and fr & P.FR_RXFE
    assert not fr & (P.FR_BUSY | P.FR_TXFF | P.FR_RXFF)
    uart.feed(b"ab")
    fr = uart.mmio_read(0, P.UARTFR, 4)
    assert not fr & P.FR_RXFE and fr & P.FR_TXFE
    assert uart.mmio_read(0, P.UARTDR, 4) == ord("a")
    assert uart.mmio_read(0, P.UARTDR, 4) == ord("b")
    assert uart.mmio_read(0, P.UARTFR, 4) & P.FR_RXFE
    assert uart.mmio_read(0, P.UARTDR, 4) == 0             # empty
    uart.feed(bytes(16))
    assert uart.mmio_read(0, P.UARTFR, 4) & P.FR_RXFF


def test_id_registers_identify_a_pl011():
    uart, _, _ = make()
    pid = [uart.mmio_read(0, 0xFE0 + 4 * i, 4) for i in range(4)]
    cid = [uart.mmio_read(0, 0xFF0 + 4 * i, 4) for i in range(4)]
    periphid = pid[0] | pid[1] << 8 | pid[2] << 16 | pid[3] << 24
    assert periphid & 0x000FFFFF == 0x00041011          # Linux's amba id for "arm,pl011" (part 0x011, Arm)
    assert cid == [0x0D, 0xF0, 0x05, 0xB1]


def test_storage_registers_and_16_bit_access():
    uart, _, _ = make()
    assert uart.mmio_read(0, P.UARTCR, 4) == 0x300         # reset value: TXE | RXE
    uart.mmio_write(0, P.UARTCR, 2, 0x301)
    uart.mmio_write(0, P.UARTIBRD, 4, 0x1234567)
    uart.mmio_write(0, P.UARTLCR_H, 4, 0x70)
    assert uart.mmio_read(0, P.UARTCR, 2) == 0x301
    assert uart.mmio_read(0, P.UARTIBRD, 4) == 0x4567     # 16-bit register
    assert uart.mmio_read(0, P.UARTLCR_H, 4) == 0x70
    assert uart.mmio_read(0, P.UARTFR, 2) == P.FR_TXFE | P.FR_RXFE


def test_guest_mistakes_are_counted_not_raised():
    uart, _, _ = make()
    uart.mmio_write(0, P.UARTFR, 4, 0xFF)          # read-only
    uart.mmio_write(0, 0x800, 4, 1)                # reserved
    uart.mmio_write(0, P.UARTDR + 1, 1, 1)         # not at a register's start
    assert uart.mmio_read(0, 0x900, 4) == 0
    assert uart.bad_accesses == 4
    assert uart.mmio_read(0, P.UARTFR, 4) == P.FR_TXFE | P.FR_RXFE


def test_interrupt_line_follows_ris_and_mask():
    uart, _, lines = make()
    uart.mmio_write(0, P.UARTDR, 4, ord("x"))                   # TXRIS set, but masked
    assert lines == [] and uart.mmio_read(0, P.UARTRIS, 4) == P.INT_TX
    assert uart.mmio_read(0, P.UARTMIS, 4) == 0
    uart.mmio_write(0, P.UARTIMSC, 4, P.INT_TX | P.INT_RX | P.INT_RT)
    assert lines == [1] and uart.mmio_read(0, P.UARTMIS, 4) == P.INT_TX
    uart.mmio_write(0, P.UARTICR, 4, P.INT_TX)                  # clear TX: line drops
    assert lines == [1, 0]
    uart.feed(b"k")                                             # RX raises it
    assert lines == [1, 0, 1] and uart.mmio_read(0, P.UARTMIS, 4) == P.INT_RX
    uart.mmio_write(0, P.UARTICR, 4, P.INT_RX)                  # RX is a level: stays while data waits
    assert lines == [1, 0, 1]
    assert uart.mmio_read(0, P.UARTDR, 4) == ord("k")           # reading it empty drops the line
    assert lines == [1, 0, 1, 0]


def test_no_console_discards_output():
    uart = P.Pl011(None)
    uart.mmio_write(0, P.UARTDR, 4, 65)
    assert uart.tx_count == 1


def test_broken_console_does_not_raise():
    out = io.BytesIO()
    uart = P.Pl011(out)
    out.close()
    uart.mmio_write(0, P.UARTDR, 4, 65)
    uart.mmio_write(0, P.UARTDR, 4, 66)
    assert uart.out is None and uart.tx_count == 2
