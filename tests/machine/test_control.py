"""The control socket (kvmits.machine.control) and what it answers about a machine's ITS, on a
stand-in machine: the userspace ITS's model, and the model standing in for the kernel's ITS
behind the attribute calls KernelMachineIts makes (the real kernel: tests/arm64)."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from kvmits.errors import KvmError
from kvmits.its.registers import GITS_CTLR
from kvmits.its.query import ItsSnapshot, model_snapshot
from kvmits.machine.its import NoItsError
from kvmits.machine.control import MAX_REQUEST, ControlError, ControlServer, machine_handlers, request
from tests.machine.its_fakes import fake_machine, mapped_harness


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "control.sock")


def raw_exchange(path, *lines: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        f = s.makefile("rb")
        replies = []
        for line in lines:
            s.sendall(line)
            got = f.readline()
            replies.append(json.loads(got) if got else None)
        return replies


def test_requests_and_errors(sock_path):
    def boom(_req):
        raise KvmError("KVM_SET_DEVICE_ATTR", 16)

    with ControlServer(sock_path, {"echo": lambda r: r["x"] * 2, "boom": boom}) as server:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        assert request(sock_path, "echo", x=21) == 42
        with pytest.raises(ControlError, match=r"KVM_SET_DEVICE_ATTR failed: EBUSY"):
            request(sock_path, "boom")
        with pytest.raises(ControlError, match=r"unknown cmd 'nope' \(known: boom, echo\)"):
            request(sock_path, "nope")
        with pytest.raises(ControlError, match="KeyError"):
            request(sock_path, "echo")                      # missing argument
        # garbage keeps the connection: the next request on it is answered
        bad, good, notdict = raw_exchange(sock_path, b"{not json\n", b'{"cmd": "echo", "x": 1}\n', b"[1]\n")
        assert not bad["ok"] and good == {"ok": True, "result": 2} and not notdict["ok"]
        (long,) = raw_exchange(sock_path, b"x" * (MAX_REQUEST + 10) + b"\n")
        assert "longer than" in long["error"]
        assert server.errors == 6
    assert not os.path.exists(sock_path)
    with pytest.raises(ControlError, match="control socket"):
        request(sock_path, "echo", x=1)


def test_a_stale_socket_is_replaced_but_not_a_file(sock_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()
    with ControlServer(sock_path, {"echo": lambda r: 1}):
        assert request(sock_path, "echo") == 1
    with open(sock_path, "w") as f:
        f.write("mine")
    with pytest.raises(ControlError, match="cannot serve"):
        ControlServer(sock_path, {})
    assert open(sock_path).read() == "mine"


def test_either_its_reads_alike():
    h = mapped_harness()
    user_machine, kernel_machine = fake_machine(h, "user"), fake_machine(h, "kernel")
    user = user_machine.its.snapshot()
    kernel = kernel_machine.its.snapshot()
    assert kernel_machine.its.device.saves == 1
    assert user == model_snapshot(h.its)
    assert kernel.its == "kernel" and kernel.orphans is None and kernel.same_state(user)
    assert kernel_machine.its.translate(4, 1) == user_machine.its.translate(4, 1)
    assert kernel_machine.its.translate(4, 2).reason_name == "no-ite"          # an orphan
    assert user_machine.its.translate(4, 2).reason_name == "collection-unmapped"
    h.its.mmio_write(GITS_CTLR, 4, 0)
    assert not kernel_machine.its.snapshot().enabled
    with pytest.raises(NoItsError):
        machine_handlers(fake_machine(h, "none"))["its-dump"]({})


@pytest.mark.parametrize("kind", ["kernel", "user"])
def test_the_machine_handlers_over_the_socket(sock_path, kind):
    h = mapped_harness()
    with ControlServer(sock_path, machine_handlers(fake_machine(h, kind))):
        snap = ItsSnapshot.from_json(request(sock_path, "its-dump"))
        assert snap.its == kind and snap.same_state(model_snapshot(h.its))
        assert request(sock_path, "its-translate", devid=4, eventid=1) == {
            "intid": 8192, "icid": 0, "vcpu": 1, "reason": "translated", "its": kind, "shared_with": [],
            "lpi_vcpu": 1 if kind == "user" else None}
        assert request(sock_path, "info")["its"] == kind
        for bad in ({"devid": -1, "eventid": 0}, {"devid": 0, "eventid": "1"}, {"devid": 1 << 32, "eventid": 0}):
            with pytest.raises(ControlError, match="must be an integer"):
                request(sock_path, "its-translate", **bad)


def test_no_its_is_an_answer_not_a_crash(sock_path):
    with ControlServer(sock_path, machine_handlers(fake_machine(mapped_harness(), "none"))):
        with pytest.raises(ControlError, match="has no ITS"):
            request(sock_path, "its-dump")
        assert request(sock_path, "info")["its"] is None
