"""ITS commands: numbers, field layouts, command error codes, and an encoder per command.

Arm IHI 0069, 5.3 ("ITS commands"): a command is 32 bytes, four little-endian doublewords
DW0..DW3, with the command number in DW0[7:0]. Each command's fields are defined once, in
LAYOUTS below, by the names of the command's page in 5.3 (DeviceID, EventID, pINTID, ICID, RDbase,
RDbase1, RDbase2, Size, ITT_addr, V); the model's handlers (Layout.read), decode_command() and
the encoders (Layout.encode) are all derived from that one table.

RDbase: with GITS_TYPER.PTA == 0 it is a processor (vCPU) number. The architecture gives
the field as bits [50:16]; the in-kernel ITS reads 32 bits from bit 16 (vgic-its.c,
its_cmd_get_target_addr), so bits [50:48] are ignored here too (a guest cannot tell the two
apart).

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


# -- field layouts (IHI 0069 5.3) ------------------------------------------------------------
COMMAND = struct.Struct("<4Q")
#: DW0[7:0]: the command number, in every command
COMMAND_NUMBER_MASK = 0xFF


class Field(NamedTuple):
    """One field of a command: IHI 0069's `name`, where it lies (DW`dword`[lsb + width - 1:lsb]),
    and the `key` decode_command() and the encoders call it by.

    `in_place`: the field is the same bits of an address (ITT_addr is bits [51:8] of the ITT's
    address): its value keeps its bit position. `bias`: the field holds value - bias (Size holds
    the number of EventID bits minus one)."""

    name: str
    key: str
    dword: int
    lsb: int
    width: int
    in_place: bool = False
    bias: int = 0

    @property
    def mask(self) -> int:
        return (1 << self.width) - 1

    def expression(self) -> str:
        """The field's value as Python source over dw0..dw3 (what Layout.read is compiled from)."""
        dw = f"dw{self.dword}"
        if self.in_place:
            expr = f"{dw} & {self.mask << self.lsb:#x}"
        elif self.lsb + self.width == 64:
            expr = f"{dw} >> {self.lsb}"                 # a dword is 64 bits: nothing above
        elif self.lsb == 0:
            expr = f"{dw} & {self.mask:#x}"
        else:
            expr = f"({dw} >> {self.lsb}) & {self.mask:#x}"
        return f"({expr}) + {self.bias}" if self.bias else expr


DEVICE_ID = Field("DeviceID", "devid", 0, 32, 32)
EVENT_ID = Field("EventID", "eventid", 1, 0, 32)
P_INTID = Field("pINTID", "intid", 1, 32, 32)
SIZE = Field("Size", "size_bits", 1, 0, 5, bias=1)
ITT_ADDR = Field("ITT_addr", "itt_addr", 2, 8, 44, in_place=True)       # [51:8]
VALID = Field("V", "valid", 2, 63, 1)
ICID = Field("ICID", "icid", 2, 0, 16)
RDBASE = Field("RDbase", "rdbase", 2, 16, 32)                           # [50:16], 32 bits read (above)
RDBASE1 = Field("RDbase1", "rdbase1", 2, 16, 32)                        # MOVALL
RDBASE2 = Field("RDbase2", "rdbase2", 3, 16, 32)                        # MOVALL


class Layout:
    """The fields of one command, and what is derived from them:

    - `read(dw0, dw1, dw2, dw3)`: the fields' values as a tuple, in `fields` order;
    - `bind(handler)`: the same values passed to `handler` (the model's command dispatch);
    - `encode(**values)`: the 32 bytes of the command, every field masked to its width (a
      one-bit field set by any true value), compiled from the layout like the reads."""

    def __init__(self, number: int, fields: tuple[Field, ...]):
        self.number = number
        self.name = COMMAND_NAMES[number]
        self.fields = fields
        bits = [0, 0, 0, 0]
        for f in fields:
            span = f.mask << f.lsb
            if f.lsb + f.width > 64 or bits[f.dword] & span or (f.dword == 0 and span & COMMAND_NUMBER_MASK):
                raise ValueError(f"{self.name}: field {f.name} overlaps another or leaves DW{f.dword}")
            bits[f.dword] |= span
        # compiled once, here: one expression per field; bind() only closes over a handler
        args = ", ".join(f.expression() for f in fields)
        source = (f"def bind_{self.name}(handler):\n"
                  f"    def {self.name}_fields(dw0, dw1, dw2, dw3):\n"
                  f"        return handler({args})\n"
                  f"    return {self.name}_fields\n")
        namespace: dict = {}
        exec(compile(source, f"<ITS {self.name} layout>", "exec"), namespace)   # noqa: S102 - our own source
        self._bind = namespace[f"bind_{self.name}"]
        self.read = self.bind(lambda *values: values)
        # the encoder, compiled the same way: one term per field, OR-ed into its doubleword;
        # a one-bit field (V) takes any truth value, as a flag
        terms: list[list[str]] = [[str(number)], [], [], []]
        for f in fields:
            if f.width == 1:
                term = f"({1 << f.lsb:#x} if {f.key} else 0)"
            else:
                v = f"(int({f.key}) - {f.bias})" if f.bias else f"int({f.key})"
                term = f"({v} & {f.mask << f.lsb:#x})" if f.in_place else f"(({v} & {f.mask:#x}) << {f.lsb})"
            terms[f.dword].append(term)
        body = ", ".join(" | ".join(t) if t else "0" for t in terms)
        source = (f"def encode_{self.name}({', '.join(f.key for f in fields)}):\n"
                  f"    return pack({body})\n")
        namespace = {"pack": COMMAND.pack}
        exec(compile(source, f"<ITS {self.name} encoder>", "exec"), namespace)   # noqa: S102 - our own source
        self.encode = namespace[f"encode_{self.name}"]

    def bind(self, handler):
        """A function of (dw0, dw1, dw2, dw3) that calls `handler` with this command's field
        values, in `fields` order, read by expressions compiled from the layout: a command
        handler costs no more than one reading its fields by hand."""
        return self._bind(handler)

    def __repr__(self) -> str:
        return f"Layout({self.name}: {', '.join(f'{f.name} DW{f.dword}[{f.lsb + f.width - 1}:{f.lsb}]' for f in self.fields)})"


#: every physical-LPI command's fields, as IHI 0069 5.3 lays them out
LAYOUTS = {layout.number: layout for layout in (
    Layout(GITS_CMD_MAPD, (DEVICE_ID, SIZE, ITT_ADDR, VALID)),
    Layout(GITS_CMD_MAPC, (ICID, RDBASE, VALID)),
    Layout(GITS_CMD_MAPTI, (DEVICE_ID, EVENT_ID, P_INTID, ICID)),
    Layout(GITS_CMD_MAPI, (DEVICE_ID, EVENT_ID, ICID)),
    Layout(GITS_CMD_MOVI, (DEVICE_ID, EVENT_ID, ICID)),
    Layout(GITS_CMD_INT, (DEVICE_ID, EVENT_ID)),
    Layout(GITS_CMD_CLEAR, (DEVICE_ID, EVENT_ID)),
    Layout(GITS_CMD_INV, (DEVICE_ID, EVENT_ID)),
    Layout(GITS_CMD_DISCARD, (DEVICE_ID, EVENT_ID)),
    Layout(GITS_CMD_INVALL, (ICID,)),
    Layout(GITS_CMD_MOVALL, (RDBASE1, RDBASE2)),
    Layout(GITS_CMD_SYNC, (RDBASE,)),
)}


def decode_command(dw0: int, dw1: int, dw2: int, dw3: int) -> dict:
    """The fields of a command as a dict (for observers, logs and tools; not the hot path)."""
    cmd = dw0 & COMMAND_NUMBER_MASK
    out: dict = {"command": command_name(cmd)}
    layout = LAYOUTS.get(cmd)
    if layout is not None:
        for f, value in zip(layout.fields, layout.read(dw0, dw1, dw2, dw3)):
            out[f.key] = bool(value) if f.width == 1 else value
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
_MAPD, _MAPC, _MAPTI, _MAPI, _MOVI, _INT, _CLEAR, _INV, _DISCARD, _INVALL, _MOVALL, _SYNC = (
    LAYOUTS[c].encode for c in (GITS_CMD_MAPD, GITS_CMD_MAPC, GITS_CMD_MAPTI, GITS_CMD_MAPI, GITS_CMD_MOVI,
                                GITS_CMD_INT, GITS_CMD_CLEAR, GITS_CMD_INV, GITS_CMD_DISCARD, GITS_CMD_INVALL,
                                GITS_CMD_MOVALL, GITS_CMD_SYNC))


def encode_mapd(devid: int, itt_addr: int, size_bits: int, valid: bool = True) -> bytes:
    """MAPD: map DeviceID to an ITT at `itt_addr` (256 B aligned) for `size_bits` EventID bits."""
    return _MAPD(devid=devid, itt_addr=itt_addr, size_bits=size_bits, valid=valid)


def encode_mapc(icid: int, rdbase: int, valid: bool = True) -> bytes:
    return _MAPC(icid=icid, rdbase=rdbase, valid=valid)


def encode_mapti(devid: int, eventid: int, intid: int, icid: int) -> bytes:
    return _MAPTI(devid=devid, eventid=eventid, intid=intid, icid=icid)


def encode_mapi(devid: int, eventid: int, icid: int) -> bytes:
    return _MAPI(devid=devid, eventid=eventid, icid=icid)


def encode_movi(devid: int, eventid: int, icid: int) -> bytes:
    return _MOVI(devid=devid, eventid=eventid, icid=icid)


def encode_int(devid: int, eventid: int) -> bytes:
    return _INT(devid=devid, eventid=eventid)


def encode_clear(devid: int, eventid: int) -> bytes:
    return _CLEAR(devid=devid, eventid=eventid)


def encode_inv(devid: int, eventid: int) -> bytes:
    return _INV(devid=devid, eventid=eventid)


def encode_discard(devid: int, eventid: int) -> bytes:
    return _DISCARD(devid=devid, eventid=eventid)


def encode_invall(icid: int) -> bytes:
    return _INVALL(icid=icid)


def encode_movall(rdbase1: int, rdbase2: int) -> bytes:
    return _MOVALL(rdbase1=rdbase1, rdbase2=rdbase2)


def encode_sync(rdbase: int = 0) -> bytes:
    return _SYNC(rdbase=rdbase)


def encode_raw(dw0: int, dw1: int = 0, dw2: int = 0, dw3: int = 0) -> bytes:
    """Any 32-byte command (unknown command numbers, reserved bits set, ...)."""
    m = (1 << 64) - 1
    return COMMAND.pack(dw0 & m, dw1 & m, dw2 & m, dw3 & m)
