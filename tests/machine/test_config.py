"""MachineConfig: what the user may choose, checked before KVM is touched."""

import pytest

from kvmits.machine import ITS_KINDS, MachineConfig


def test_defaults():
    cfg = MachineConfig()
    assert (cfg.cpus, cfg.mem_size, cfg.its, cfg.nr_irqs, cfg.agent) == (1, 128 << 20, "kernel", 128, False)
    assert ITS_KINDS == ("kernel", "user")


@pytest.mark.parametrize("kw", [dict(its="User"), dict(its="none"), dict(cpus=0), dict(cpus=124),
                                dict(mem_size=(2 << 20) + 4096), dict(nr_irqs=100), dict(nr_irqs=32)])
def test_bad_configs(kw):
    with pytest.raises(ValueError):
        MachineConfig(**kw)


def test_no_its_is_none():
    assert MachineConfig(its=None).its is None
