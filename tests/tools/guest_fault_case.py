"""Run only inside the testbed, by test_testbed_guest_fault.py: one passing test, then one that
makes the guest kernel panic on purpose (sysrq 'c'), so that the testbed must report the fault
as this test's failure. Not collected by a plain pytest run (the name does not match
test_*.py), and it does nothing unless both the testbed's KVMITS_TESTBED=1 and
KVMITS_TESTBED_FAULT_CASE=1 are set: on a real machine it would crash the kernel."""

import os

import pytest

ARMED = os.environ.get("KVMITS_TESTBED") == "1" and os.environ.get("KVMITS_TESTBED_FAULT_CASE") == "1"
pytestmark = pytest.mark.skipif(not ARMED, reason="crashes the kernel it runs on: only for "
                                "tools/testbed run -e KVMITS_TESTBED_FAULT_CASE=1")


def test_before_the_fault():
    assert os.environ["KVMITS_TESTBED_KERNEL"]


def test_the_guest_kernel_panics():
    # sysrq 'c' calls panic("sysrq triggered crash"); /proc/sysrq-trigger takes every
    # command from root whatever kernel.sysrq says
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("c")
    pytest.fail("the kernel survived sysrq-c")
