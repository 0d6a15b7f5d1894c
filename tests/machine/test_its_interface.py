"""The two implementations of a machine's ITS satisfy the one protocol (MachineIts): every call of
it exists in both with the same signature, and, over the same ITS state, both answer alike
where the architecture says they must (the real kernel: tests/arm64/test_its_query.py)."""

from __future__ import annotations

import inspect

import pytest

from kvmits.its.query import ItsSnapshot
from kvmits.machine import Machine
from kvmits.machine.its import ITS_IMPLEMENTATIONS, ITS_KINDS, KernelMachineIts, MachineIts, UserMachineIts
from tests.machine.its_fakes import fake_machine, mapped_harness

IMPLEMENTATIONS = [KernelMachineIts, UserMachineIts]


def protocol_calls() -> dict[str, inspect.Signature]:
    """Every public call MachineIts defines, with its signature."""
    calls = {}
    for name, member in inspect.getmembers(MachineIts):
        if name.startswith("_") or isinstance(inspect.getattr_static(MachineIts, name), property):
            continue
        if callable(member):
            calls[name] = inspect.signature(member)
    return calls


def test_the_protocol_is_not_empty():
    assert {"signal_msi", "set_msi_routes", "reset", "snapshot", "translate", "saved_tables", "lpi_vcpu",
            "orphaned_ites", "stats", "create", "attach", "detach", "close", "translation_report"} <= set(protocol_calls())


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_each_implementation_has_every_call_with_the_same_signature(cls):
    assert issubclass(cls, MachineIts) and not inspect.isabstract(cls), cls.__abstractmethods__
    for name, signature in protocol_calls().items():
        mine = inspect.signature(getattr(cls, name))
        assert list(mine.parameters) == list(signature.parameters), (cls.__name__, name, mine, signature)
        for p, q in zip(mine.parameters.values(), signature.parameters.values()):
            assert (p.kind, p.default) == (q.kind, q.default), (cls.__name__, name, p, q)
    assert isinstance(cls.live_translation, bool)


def test_the_kinds_a_machine_accepts_are_the_implementations():
    assert ITS_KINDS == ("kernel", "user")
    for kind, cls in ITS_IMPLEMENTATIONS.items():
        assert cls.kind == kind


def test_the_machine_knows_its_its_only_through_the_protocol():
    source = inspect.getsource(inspect.getmodule(Machine))
    for name in ("UserMachineIts", "KernelMachineIts", "HiddenIts", "user_its", ".model", ".hidden"):
        assert name not in source, name


def test_both_answer_alike_over_the_same_state():
    h = mapped_harness()
    kernel, user = fake_machine(h, "kernel").its, fake_machine(h, "user").its
    ks, us = kernel.snapshot(), user.snapshot()
    assert isinstance(ks, ItsSnapshot) and isinstance(us, ItsSnapshot)
    assert (ks.its, us.its) == ("kernel", "user") and ks.same_state(us)
    assert kernel.saved_tables().dump == user.saved_tables().dump
    for devid, eventid in ((4, 1), (4, 3), (5, 0)):
        assert kernel.translate(devid, eventid) == user.translate(devid, eventid)
    # what only the userspace ITS can tell: the orphan, and where KVM has each LPI
    assert (kernel.orphaned_ites(), user.orphaned_ites()) == (None, ((4, 2),))
    assert (kernel.lpi_vcpu(8192), user.lpi_vcpu(8192)) == (None, 1)
    k, u = kernel.translation_report(4, 1), user.translation_report(4, 1)
    assert (k.pop("its"), u.pop("its")) == ("kernel", "user")
    assert (k.pop("lpi_vcpu"), u.pop("lpi_vcpu")) == (None, 1)
    assert k == u and k["shared_with"] == []
    assert kernel.stats() == {} and user.stats()["vcpu_stops"] == 0
    assert (kernel.doorbell, user.doorbell) == (kernel.base + 0x10040, user.base + 0x10040)
