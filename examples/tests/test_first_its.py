"""A first bring-up test with kvmits' pytest plugin (docs/writing-tests.md walks through it).

It uses only the plugin's documented surface: the `its_lab` fixture (an arm64 VM with the
guest agent on every vCPU, LPIs and the ITS set up, collection n on vCPU n), which runs each
test once with the kernel's ITS and once with kvmits' userspace ITS. Run it with

    kvmits test examples/tests/test_first_its.py

natively on an arm64 KVM host, inside the arm64 testbed anywhere else.
"""

import pytest

pytestmark = pytest.mark.arm64_kvm

LPI = 8200          # an LPI INTID (LPIs start at 8192)


def test_an_msi_arrives_on_the_vcpu_of_its_collection(its_lab):
    devid = 0x10
    its_lab.its.mapd(devid, event_bits=2)          # a device with 4 events; its ITT in guest RAM
    its_lab.its.mapti(devid, 0, LPI, icid=2)       # event 0 -> LPI 8200 in collection 2 (vCPU 2)
    assert its_lab.msi(devid, 0) == 1              # KVM_SIGNAL_MSI: delivered
    its_lab.expect(cpu=2, intid=LPI)               # the guest took it, on vCPU 2


def test_movi_moves_the_next_msi_to_another_vcpu(its_lab):
    devid = 0x11
    its_lab.its.mapd(devid, event_bits=2)
    its_lab.its.mapti(devid, 1, LPI + 1, icid=1)
    its_lab.its.movi(devid, 1, icid=3)             # the event's collection is now 3 (vCPU 3)
    its_lab.msi(devid, 1)
    its_lab.expect(cpu=3, intid=LPI + 1)


def test_an_unmapped_event_is_dropped(its_lab):
    devid = 0x12
    its_lab.its.mapd(devid, event_bits=2)          # mapped device, event 3 has no ITE
    assert its_lab.msi(devid, 3) == 0              # does not translate: nothing delivered
    its_lab.expect_none()
