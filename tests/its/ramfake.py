"""Test doubles for the ITS model: a bounds-checked RAM that records accesses, and a harness
that programs an ITS the way a guest driver does (tables, queue, enable, commands)."""

from __future__ import annotations

from kvmits.errors import GuestMemoryError
from kvmits.its import ItsConfig, ItsModel, RecordingSink, Redistributors
from kvmits.its import commands as C
from kvmits.its import registers as R
from kvmits.lab.differential import generate_program, probe_ops

RAM_BASE = 0x4000_0000
RAM_SIZE = 8 << 20


class FakeRam:
    """`size` bytes of guest RAM at `base`; every access is recorded as
    (kind, gpa, size, inside) and one outside RAM raises GuestMemoryError."""

    def __init__(self, base: int = RAM_BASE, size: int = RAM_SIZE):
        self.base = base
        self.size = size
        self.buf = bytearray(size)
        self.accesses: list[tuple[str, int, int, bool]] = []

    def inside(self, gpa: int, size: int) -> bool:
        return size >= 0 and self.base <= gpa and gpa + size <= self.base + self.size

    def read(self, gpa: int, size: int) -> bytes:
        ok = self.inside(gpa, size)
        self.accesses.append(("read", gpa, size, ok))
        if not ok:
            raise GuestMemoryError(gpa, size)
        off = gpa - self.base
        return bytes(self.buf[off:off + size])

    def write(self, gpa: int, data: bytes) -> None:
        ok = self.inside(gpa, len(data))
        self.accesses.append(("write", gpa, len(data), ok))
        if not ok:
            raise GuestMemoryError(gpa, len(data))
        off = gpa - self.base
        self.buf[off:off + len(data)] = data

    # conveniences for tests (not recorded)
    def poke(self, gpa: int, data: bytes) -> None:
        off = gpa - self.base
        self.buf[off:off + len(data)] = data

    def poke_u64(self, gpa: int, value: int) -> None:
        self.poke(gpa, value.to_bytes(8, "little"))

    def peek_u64(self, gpa: int) -> int:
        off = gpa - self.base
        return int.from_bytes(self.buf[off:off + 8], "little")

    def writes(self) -> list[tuple]:
        return [a for a in self.accesses if a[0] == "write"]


# A guest memory layout inside the fake RAM (all 64 KiB aligned, as KVM needs).
QUEUE = RAM_BASE + 0x00000          # command queue
DEVICE_TABLE = RAM_BASE + 0x10000
COLLECTION_TABLE = RAM_BASE + 0x20000
L2_PAGES = RAM_BASE + 0x30000       # level-2 device table pages (64 KiB each)
ITTS = RAM_BASE + 0x100000          # ITTs, 0x1000 apart


def itt(n: int) -> int:
    return ITTS + n * 0x1000


class Harness:
    """An ItsModel on a FakeRam with a RecordingSink, programmed like a guest driver."""

    def __init__(self, config: ItsConfig | None = None, nr_vcpus: int = 4,
                 lpi_limit: int = 1 << 16, queue_pages: int = 1, enable: bool = True,
                 dt_pages: int = 1, ct_pages: int = 1, ram: FakeRam | None = None,
                 queue_base: int = QUEUE):
        self.ram = ram or FakeRam()
        self.sink = RecordingSink()
        self.lpi_limit = lpi_limit
        self.its = ItsModel(self.ram, self.sink, Redistributors(nr_vcpus, lambda: self.lpi_limit),
                            config or ItsConfig())
        self.queue_pages = queue_pages
        self.queue_base = queue_base
        self.records: list = []
        self.its.command_observers.append(self.records.append)
        if enable:
            self.setup(dt_pages=dt_pages, ct_pages=ct_pages)

    def setup(self, *, dt_pages: int = 1, ct_pages: int = 1, indirect: bool = False) -> None:
        w = self.its.mmio_write
        w(R.GITS_CBASER, 8, R.encode_cbaser(base=self.queue_base, pages=self.queue_pages))
        w(R.GITS_BASER0, 8, R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_DEVICE,
                                           base=DEVICE_TABLE, pages=dt_pages, indirect=indirect))
        w(R.GITS_BASER0 + 8, 8, R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_COLLECTION,
                                               base=COLLECTION_TABLE, pages=ct_pages))
        w(R.GITS_CTLR, 4, 1)
        assert self.its.enabled

    @property
    def queue_size(self) -> int:
        return self.queue_pages * 4096

    def enqueue(self, *commands: bytes) -> None:
        """Write commands at GITS_CWRITER (wrapping) and advance GITS_CWRITER once."""
        cw = self.its.cwriter
        for cmd in commands:
            self.ram.poke(self.queue_base + cw, cmd)
            cw = (cw + 32) % self.queue_size
        self.its.mmio_write(R.GITS_CWRITER, 8, cw)

    def run(self, *commands: bytes) -> list[int]:
        """Enqueue commands; return the error codes of the commands executed meanwhile."""
        start = len(self.records)
        self.enqueue(*commands)
        return [r.error for r in self.records[start:] if r.error]


def run_on_model(seed: int, probe: bool = False, cpus: int = 4) -> Harness:
    """The differential check's program `seed` (kvmits.lab.differential) on an ItsModel
    set up as ItsLab sets up an ITS (collection n -> vCPU n), ITTs allocated in program order
    as ProgramRunner allocates them; with `probe`, the orphan probe after it."""
    h = Harness(ItsConfig(log_limit=0), nr_vcpus=cpus, ram=FakeRam(size=2 << 20))
    assert h.run(*[C.encode_mapc(c, c) for c in range(cpus)]) == []
    itts: dict = {}
    heap = [RAM_BASE + 0x40000]                 # after the tables ramfake lays out

    def itt_of(devid, bits):
        if (devid, bits) not in itts:
            itts[(devid, bits)] = heap[0]
            heap[0] += max((1 << bits) * 8, 256)
        return itts[(devid, bits)]

    h.records.clear()
    for batch in generate_program(seed, cpus=cpus):
        h.enqueue(*(op.encode(itt_of) for op in batch))
    if probe:
        h.enqueue(*(op.encode(itt_of) for op in probe_ops(h.its.orphaned_ites())))
    return h
