"""Fixtures of the arm64 tests."""

import pytest

#: vCPUs of the shared ITS lab
LAB_CPUS = 4


@pytest.fixture(scope="module", params=["kernel", "user"])
def lab(arm64_kvm, request):
    """A 4-vCPU ItsLab per module, once with each ITS, set up (LPIs, ITS tables, MAPC n -> n)."""
    from kvmits.lab.its_lab import ItsLab

    with ItsLab(cpus=LAB_CPUS, its=request.param) as lab:
        lab.setup()
        yield lab
