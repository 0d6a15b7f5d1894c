"""ITS commands: numbers, field layouts, command error codes, and an encoder per command.

Arm IHI 0069, chapter 5 ("ITS commands"): a command is 32 bytes, four little-endian
doublewords DW0..DW3, with the command number in DW0[7:0]. The fields used here:

    DeviceID  DW0[63:32]      EventID  DW1[31:0]        pINTID  DW1[63:32] (MAPTI)
    Size      DW1[4:0]        ITT_addr DW2[51:8] (MAPD) V       DW2[63]    (MAPD, MAPC)
    ICID      DW2[15:0]       RDbase   DW2[47:16]       RDbase2 DW3[47:16] (MOVALL)

RDbase: with GITS_TYPER.PTA == 0 it is a processor (vCPU) number. The architecture gives
the field as bits [50:16]; the in-kernel ITS reads 32 bits from bit 16, so bits [50:48]
are ignored here too (a guest cannot tell the two apart).

Command error codes follow the architecture's encoding 0x01_CC_EE (CC: the command's row,
EE: the kind of error), the names Linux KVM uses (E_ITS_*). The codes 0x01FFxx are this
model's IMPLEMENTATION DEFINED ones.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# -- command numbers -----------------------------------------------------------------------
GITS_CMD_MOVI = 0x01
GITS_CMD_INT = 0x03
GITS_CMD_CLEAR = 0x04
GITS_CMD_SYNC = 0x05
GITS_CMD_MAPD = 0x08
GITS_CMD_MAPC = 0x09
GITS_CMD_MAPTI = 0x0A
GITS_CMD_MAPI = 0x0B
GITS_CMD_INV = 0x0C
GITS_CMD_INVALL = 0x0D
GITS_CMD_MOVALL = 0x0E
GITS_CMD_DISCARD = 0x0F
# GICv4 virtual-LPI commands: not supported by this model (handled as unknown commands).
GITS_CMD_VMOVI = 0x21
GITS_CMD_VMOVP = 0x22
GITS_CMD_VSGI = 0x23
GITS_CMD_VSYNC = 0x25
GITS_CMD_VMAPP = 0x29
GITS_CMD_VMAPTI = 0x2A
GITS_CMD_VMAPI = 0x2B
GITS_CMD_VINVALL = 0x2D
GITS_CMD_INVDB = 0x2E

COMMAND_NAMES = {
    GITS_CMD_MOVI: "MOVI", GITS_CMD_INT: "INT", GITS_CMD_CLEAR: "CLEAR", GITS_CMD_SYNC: "SYNC",
    GITS_CMD_MAPD: "MAPD", GITS_CMD_MAPC: "MAPC", GITS_CMD_MAPTI: "MAPTI", GITS_CMD_MAPI: "MAPI",
    GITS_CMD_INV: "INV", GITS_CMD_INVALL: "INVALL", GITS_CMD_MOVALL: "MOVALL",
    GITS_CMD_DISCARD: "DISCARD", GITS_CMD_VMOVI: "VMOVI", GITS_CMD_VMOVP: "VMOVP",
    GITS_CMD_VSGI: "VSGI", GITS_CMD_VSYNC: "VSYNC", GITS_CMD_VMAPP: "VMAPP",
    GITS_CMD_VMAPTI: "VMAPTI", GITS_CMD_VMAPI: "VMAPI", GITS_CMD_VINVALL: "VINVALL",
    GITS_CMD_INVDB: "INVDB",
}


def command_name(cmd: int) -> str:
    return COMMAND_NAMES.get(cmd, f"CMD_{cmd:#04x}")


# -- command error codes -------------------------------------------------------------------
# EE (bits [7:0]) values used by the architecture:
#   01 DeviceID out of range     02 ITT size / processor number out of range
#   03 ICID out of range         04 DeviceID not mapped     05 EventID out of range
#   06 pINTID out of range       07 no (valid) ITE          09 collection not mapped
E_ITS_MOVI_DEVICE_OOR = 0x010101
E_ITS_MOVI_COLLECTION_OOR = 0x010103
E_ITS_MOVI_UNMAPPED_DEVICE = 0x010104
E_ITS_MOVI_ID_OOR = 0x010105
E_ITS_MOVI_UNMAPPED_INTERRUPT = 0x010107
E_ITS_MOVI_UNMAPPED_COLLECTION = 0x010109
E_ITS_INT_DEVICE_OOR = 0x010301
E_ITS_INT_UNMAPPED_DEVICE = 0x010304
E_ITS_INT_ID_OOR = 0x010305
E_ITS_INT_UNMAPPED_INTERRUPT = 0x010307
E_ITS_INT_UNMAPPED_COLLECTION = 0x010309
E_ITS_CLEAR_DEVICE_OOR = 0x010501
E_ITS_CLEAR_UNMAPPED_DEVICE = 0x010504
E_ITS_CLEAR_ID_OOR = 0x010505
E_ITS_CLEAR_UNMAPPED_INTERRUPT = 0x010507
E_ITS_CLEAR_UNMAPPED_COLLECTION = 0x010509
E_ITS_MAPD_DEVICE_OOR = 0x010801
E_ITS_MAPD_ITTSIZE_OOR = 0x010802
E_ITS_MAPC_PROCNUM_OOR = 0x010902
E_ITS_MAPC_COLLECTION_OOR = 0x010903
E_ITS_MAPTI_DEVICE_OOR = 0x010A01
E_ITS_MAPTI_COLLECTION_OOR = 0x010A03
E_ITS_MAPTI_UNMAPPED_DEVICE = 0x010A04
E_ITS_MAPTI_ID_OOR = 0x010A05
E_ITS_MAPTI_PHYSICALID_OOR = 0x010A06
E_ITS_MAPI_DEVICE_OOR = 0x010B01
E_ITS_MAPI_COLLECTION_OOR = 0x010B03
E_ITS_MAPI_UNMAPPED_DEVICE = 0x010B04
E_ITS_MAPI_ID_OOR = 0x010B05
E_ITS_MAPI_PHYSICALID_OOR = 0x010B06
E_ITS_INV_DEVICE_OOR = 0x010C01
E_ITS_INV_UNMAPPED_DEVICE = 0x010C04
E_ITS_INV_ID_OOR = 0x010C05
E_ITS_INV_UNMAPPED_INTERRUPT = 0x010C07
E_ITS_INV_UNMAPPED_COLLECTION = 0x010C09
E_ITS_INVALL_COLLECTION_OOR = 0x010D03
E_ITS_INVALL_UNMAPPED_COLLECTION = 0x010D09
E_ITS_MOVALL_PROCNUM_OOR = 0x010E01
E_ITS_DISCARD_DEVICE_OOR = 0x010F01
E_ITS_DISCARD_UNMAPPED_DEVICE = 0x010F04
E_ITS_DISCARD_ID_OOR = 0x010F05
E_ITS_DISCARD_UNMAPPED_INTERRUPT = 0x010F07
E_ITS_DISCARD_UNMAPPED_COLLECTION = 0x010F09
# IMPLEMENTATION DEFINED (this model):
E_ITS_UNKNOWN_COMMAND = 0x01FF00       # not a physical-LPI command (GICv4 ones included)
E_ITS_CMDQ_READ_FAULT = 0x01FF01       # the command's 32 bytes are not in guest RAM
E_ITS_OUT_OF_RESOURCES = 0x01FF02      # the model's ITE limit (ItsConfig.max_ites) is reached

ERROR_NAMES = {value: name for name, value in globals().items() if name.startswith("E_ITS_")}


def error_name(code: int) -> str:
    return ERROR_NAMES.get(code, f"E_ITS_{code:#08x}")


# Per-command error codes of the checks several commands share, indexed by command number:
# (DeviceID OOR, device not mapped, EventID OOR, no ITE, collection not mapped).
_LOOKUP_ERRORS = {
    GITS_CMD_MOVI: (E_ITS_MOVI_DEVICE_OOR, E_ITS_MOVI_UNMAPPED_DEVICE, E_ITS_MOVI_ID_OOR,
                    E_ITS_MOVI_UNMAPPED_INTERRUPT, E_ITS_MOVI_UNMAPPED_COLLECTION),
    GITS_CMD_INT: (E_ITS_INT_DEVICE_OOR, E_ITS_INT_UNMAPPED_DEVICE, E_ITS_INT_ID_OOR,
                   E_ITS_INT_UNMAPPED_INTERRUPT, E_ITS_INT_UNMAPPED_COLLECTION),
    GITS_CMD_CLEAR: (E_ITS_CLEAR_DEVICE_OOR, E_ITS_CLEAR_UNMAPPED_DEVICE, E_ITS_CLEAR_ID_OOR,
                     E_ITS_CLEAR_UNMAPPED_INTERRUPT, E_ITS_CLEAR_UNMAPPED_COLLECTION),
    GITS_CMD_INV: (E_ITS_INV_DEVICE_OOR, E_ITS_INV_UNMAPPED_DEVICE, E_ITS_INV_ID_OOR,
                   E_ITS_INV_UNMAPPED_INTERRUPT, E_ITS_INV_UNMAPPED_COLLECTION),
    GITS_CMD_DISCARD: (E_ITS_DISCARD_DEVICE_OOR, E_ITS_DISCARD_UNMAPPED_DEVICE,
                       E_ITS_DISCARD_ID_OOR, E_ITS_DISCARD_UNMAPPED_INTERRUPT,
                       E_ITS_DISCARD_UNMAPPED_COLLECTION),
}


def lookup_errors(cmd: int) -> tuple[int, int, int, int, int]:
    """(DeviceID OOR, unmapped device, EventID OOR, no ITE, unmapped collection) codes."""
    return _LOOKUP_ERRORS[cmd]


# -- decoding ------------------------------------------------------------------------------
COMMAND = struct.Struct("<4Q")


def decode_command(dw0: int, dw1: int, dw2: int, dw3: int) -> dict:
    """The fields of a command as a dict (for observers, logs and tools; not the hot path)."""
    cmd = dw0 & 0xFF
    out: dict = {"command": command_name(cmd)}
    devid = dw0 >> 32
    eventid = dw1 & 0xFFFF_FFFF
    icid = dw2 & 0xFFFF
    if cmd == GITS_CMD_MAPD:
        out.update(devid=devid, size_bits=(dw1 & 0x1F) + 1,
                   itt_addr=dw2 & 0x000F_FFFF_FFFF_FF00, valid=bool(dw2 >> 63))
    elif cmd == GITS_CMD_MAPC:
        out.update(icid=icid, rdbase=(dw2 >> 16) & 0xFFFF_FFFF, valid=bool(dw2 >> 63))
    elif cmd == GITS_CMD_MAPTI:
        out.update(devid=devid, eventid=eventid, intid=dw1 >> 32, icid=icid)
    elif cmd in (GITS_CMD_MAPI, GITS_CMD_MOVI):
        out.update(devid=devid, eventid=eventid, icid=icid)
    elif cmd in (GITS_CMD_INT, GITS_CMD_CLEAR, GITS_CMD_INV, GITS_CMD_DISCARD):
        out.update(devid=devid, eventid=eventid)
    elif cmd == GITS_CMD_INVALL:
        out.update(icid=icid)
    elif cmd == GITS_CMD_MOVALL:
        out.update(rdbase1=(dw2 >> 16) & 0xFFFF_FFFF, rdbase2=(dw3 >> 16) & 0xFFFF_FFFF)
    elif cmd == GITS_CMD_SYNC:
        out.update(rdbase=(dw2 >> 16) & 0xFFFF_FFFF)
    return out


class CommandRecord(NamedTuple):
    """One processed command, as command observers see it."""

    offset: int          # byte offset of the command in the queue (GITS_CREADR before it)
    command: int         # DW0[7:0]
    dwords: tuple        # (DW0, DW1, DW2, DW3)
    error: int           # 0, or the command error code
    stalled: bool        # the queue stalled on this command (ErrorPolicy.STALL)

    @property
    def name(self) -> str:
        return command_name(self.command)

    @property
    def error_name(self) -> str:
        return error_name(self.error) if self.error else ""

    @property
    def fields(self) -> dict:
        return decode_command(*self.dwords)


# -- encoding (guest drivers, tests, benchmarks, a VMM programming a hidden ITS) -------------
def _pack(dw0: int, dw1: int = 0, dw2: int = 0, dw3: int = 0) -> bytes:
    return COMMAND.pack(dw0 & 0xFFFF_FFFF_FFFF_FFFF, dw1 & 0xFFFF_FFFF_FFFF_FFFF,
                        dw2 & 0xFFFF_FFFF_FFFF_FFFF, dw3 & 0xFFFF_FFFF_FFFF_FFFF)


def encode_mapd(devid: int, itt_addr: int, size_bits: int, valid: bool = True) -> bytes:
    """MAPD: map DeviceID to an ITT at `itt_addr` (256 B aligned) for `size_bits` EventID bits."""
    return _pack(GITS_CMD_MAPD | (devid << 32), (size_bits - 1) & 0x1F,
                 (itt_addr & 0x000F_FFFF_FFFF_FF00) | ((1 << 63) if valid else 0))


def encode_mapc(icid: int, rdbase: int, valid: bool = True) -> bytes:
    return _pack(GITS_CMD_MAPC, 0,
                 (icid & 0xFFFF) | ((rdbase & 0xFFFF_FFFF) << 16) | ((1 << 63) if valid else 0))


def encode_mapti(devid: int, eventid: int, intid: int, icid: int) -> bytes:
    return _pack(GITS_CMD_MAPTI | (devid << 32), (eventid & 0xFFFF_FFFF) | (intid << 32),
                 icid & 0xFFFF)


def encode_mapi(devid: int, eventid: int, icid: int) -> bytes:
    return _pack(GITS_CMD_MAPI | (devid << 32), eventid & 0xFFFF_FFFF, icid & 0xFFFF)


def encode_movi(devid: int, eventid: int, icid: int) -> bytes:
    return _pack(GITS_CMD_MOVI | (devid << 32), eventid & 0xFFFF_FFFF, icid & 0xFFFF)


def _encode_devid_eventid(cmd: int, devid: int, eventid: int) -> bytes:
    return _pack(cmd | (devid << 32), eventid & 0xFFFF_FFFF)


def encode_int(devid: int, eventid: int) -> bytes:
    return _encode_devid_eventid(GITS_CMD_INT, devid, eventid)


def encode_clear(devid: int, eventid: int) -> bytes:
    return _encode_devid_eventid(GITS_CMD_CLEAR, devid, eventid)


def encode_inv(devid: int, eventid: int) -> bytes:
    return _encode_devid_eventid(GITS_CMD_INV, devid, eventid)


def encode_discard(devid: int, eventid: int) -> bytes:
    return _encode_devid_eventid(GITS_CMD_DISCARD, devid, eventid)


def encode_invall(icid: int) -> bytes:
    return _pack(GITS_CMD_INVALL, 0, icid & 0xFFFF)


def encode_movall(rdbase1: int, rdbase2: int) -> bytes:
    return _pack(GITS_CMD_MOVALL, 0, (rdbase1 & 0xFFFF_FFFF) << 16,
                 (rdbase2 & 0xFFFF_FFFF) << 16)


def encode_sync(rdbase: int = 0) -> bytes:
    return _pack(GITS_CMD_SYNC, 0, (rdbase & 0xFFFF_FFFF) << 16)


def encode_raw(dw0: int, dw1: int = 0, dw2: int = 0, dw3: int = 0) -> bytes:
    """Any 32-byte command (unknown command numbers, reserved bits set, ...)."""
    return _pack(dw0, dw1, dw2, dw3)
