"""Fixtures of the arm64 tests: kvmits' pytest plugin (kvmits.pytest_plugin) gives its_kind
(kernel and user, --kvmits-its), arm64_kvm and its_lab; `lab` is our name for the plugin's lab."""

import pytest

#: vCPUs of the shared ITS lab (the plugin's default --kvmits-cpus)
LAB_CPUS = 4


@pytest.fixture(scope="module")
def lab(its_lab):
    """A 4-vCPU ItsLab per module, once with each ITS, set up (LPIs, ITS tables, MAPC n -> n)."""
    assert its_lab.cpus == LAB_CPUS, "the arm64 tests expect --kvmits-cpus 4"
    return its_lab
