"""The guest-physical memory map (QEMU virt's layout)."""

import pytest

from kvmits.machine.memmap import MAX_CPUS, MemoryMap


def test_layout_is_qemu_virt():
    mm = MemoryMap(4, 256 << 20)
    assert (mm.gicd.base, mm.gicd.size) == (0x08000000, 0x10000)
    assert (mm.its.base, mm.its.size) == (0x08080000, 0x20000)
    assert (mm.gicr.base, mm.gicr.size) == (0x080A0000, 4 * 0x20000)
    assert (mm.uart.base, mm.uart.size) == (0x09000000, 0x1000)
    assert (mm.agent.base, mm.agent.size) == (0x0A000000, 0x1000)
    assert (mm.ram.base, mm.ram.size) == (0x40000000, 256 << 20)
    assert [mm.gicr_base(i) for i in range(4)] == [0x080A0000, 0x080C0000, 0x080E0000, 0x08100000]


def test_no_region_overlaps_even_at_max_cpus():
    mm = MemoryMap(MAX_CPUS, 2 << 20)
    regions = mm.regions()
    for i, a in enumerate(regions):
        for b in regions[i + 1:]:
            assert not a.overlaps(b), (a, b)
    assert mm.gicr.end <= mm.uart.base
    assert MAX_CPUS == 123


@pytest.mark.parametrize("cpus, ram", [(0, 2 << 20), (MAX_CPUS + 1, 2 << 20), (1, 0), (1, 3 << 20), (1, 1 << 40)])
def test_invalid_maps_are_refused(cpus, ram):
    with pytest.raises(ValueError):
        MemoryMap(cpus, ram)


def test_gicr_base_checks_the_cpu():
    with pytest.raises(ValueError):
        MemoryMap(2, 2 << 20).gicr_base(2)
