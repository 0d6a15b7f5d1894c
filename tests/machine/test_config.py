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


def test_disks_parse_and_need_an_its():
    from kvmits.machine.machine import Disk

    c = MachineConfig(disks=["a.img", "b.img,ro", Disk("c.img", queues=2)], rng=True)
    assert c.disks == (Disk("a.img"), Disk("b.img", readonly=True), Disk("c.img", queues=2))
    assert Disk.parse("x,y.img") == Disk("x,y.img")
    with pytest.raises(ValueError, match="no file"):
        Disk.parse(",ro")
    with pytest.raises(ValueError, match="need an ITS"):
        MachineConfig(its=None, rng=True)
