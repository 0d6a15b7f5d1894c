"""`kvmits its dump|translate` on the host: over the control socket to a stand-in machine, the
text and JSON output, the agreement verdicts, and the hand-over to the testbed on non-arm64
hosts (the real thing, both ITSes on arm64 KVM: tests/arm64/test_its_query.py)."""

from __future__ import annotations

import json

import pytest

from kvmits.cli import its as cli_its
from kvmits.cli import main
from kvmits.its.query import model_snapshot
from kvmits.machine.control import ControlServer, machine_handlers
from tests.machine.its_fakes import fake_machine, mapped_harness


@pytest.fixture(params=["kernel", "user"])
def served(request, tmp_path):
    path = str(tmp_path / "vm.sock")
    h = mapped_harness()
    with ControlServer(path, machine_handlers(fake_machine(h, request.param))):
        yield request.param, path, h


def test_dump_over_the_control_socket(served, capsys):
    kind, path, _ = served
    assert main(["its", "dump", "--connect", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kernel ITS: enabled" if kind == "kernel" else "userspace ITS: enabled")
    assert "collections -> vCPU: 0->1" in out
    assert "DeviceID 0x4: ITT" in out and "2 EventID bits, 1 mapped event(s)" in out
    assert "EventID 1      -> LPI 8192   collection 0    vCPU 1" in out
    assert ("not visible in the kernel's saved tables" if kind == "kernel" else
            "orphaned ITEs (collection unmapped): 0x4/2") in out


def test_dump_json_over_the_control_socket(served, capsys):
    kind, path, h = served
    assert main(["its", "dump", "--connect", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["its"]) == [kind]
    assert out["its"][kind]["devices"]["4"]["events"]["1"] == {"icid": 0, "intid": 8192}
    assert "same" not in out                                    # one ITS: nothing to compare


def test_translate_over_the_control_socket(served, capsys):
    kind, path, _ = served
    name = "kernel ITS    " if kind == "kernel" else "userspace ITS "
    assert main(["its", "translate", "4", "1", "--connect", path]) == 0
    assert capsys.readouterr().out == f"{name} DeviceID 0x4 EventID 1 -> LPI 8192 on vCPU 1 (collection 0)\n"
    assert main(["its", "translate", "0x4", "3", "--connect", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["its"] == {kind: {"intid": -1, "icid": -1, "vcpu": -1, "reason": "no-ite", "shared_with": [],
                                 "lpi_vcpu": None}}
    assert main(["its", "translate", "9", "0", "--connect", path]) == 0
    assert "-> no LPI: device-unmapped (no MAPD for this DeviceID)" in capsys.readouterr().out


def test_a_shared_lpi_is_pointed_out(tmp_path, capsys):
    from kvmits.its import commands as C
    from tests.its.ramfake import itt

    h = mapped_harness()
    h.run(C.encode_mapc(2, 2), C.encode_mapd(7, itt(7), 2), C.encode_mapti(7, 3, 8192, 2))   # LPI 8192 again
    path = str(tmp_path / "vm.sock")
    with ControlServer(path, machine_handlers(fake_machine(h, "kernel"))):
        assert main(["its", "translate", "7", "3", "--connect", path]) == 0
    line, note = capsys.readouterr().out.splitlines()
    assert line.endswith("-> LPI 8192 on vCPU 2 (collection 2)")
    assert "also mapped by DeviceID/EventID 0x4/1; KVM keeps one target per LPI" in note


def test_an_lpi_kvm_has_elsewhere_is_pointed_out(tmp_path, capsys):
    machine = fake_machine(mapped_harness(), "user")
    machine.its.hidden.mapping = lambda: {8192: 2}           # as after a MOVALL 1 -> 2
    path = str(tmp_path / "vm.sock")
    with ControlServer(path, machine_handlers(machine)):
        assert main(["its", "translate", "4", "1", "--connect", path]) == 0
    line, note = capsys.readouterr().out.splitlines()
    assert line.endswith("-> LPI 8192 on vCPU 1 (collection 0)")
    assert "KVM has LPI 8192 on vCPU 2 (MOVALL, or another ITE of it): the MSI is delivered there" in note


def test_connect_failures_are_clear(tmp_path, capsys):
    assert main(["its", "dump", "--connect", str(tmp_path / "none.sock")]) == 1
    assert "kvmits its: control socket" in capsys.readouterr().err


def test_the_verdicts():
    hit = {"intid": 8192, "icid": 0, "vcpu": 1, "reason": "translated"}
    miss = {"intid": -1, "icid": -1, "vcpu": -1}
    assert cli_its.translations_agree({"kernel": hit, "user": dict(hit)}) == (True, None)
    assert cli_its.translations_agree({"kernel": hit, "user": dict(hit, vcpu=2)}) == (False, None)
    assert cli_its.translations_agree({"kernel": dict(miss, reason="no-ite"),
                                       "user": dict(miss, reason="collection-unmapped")}) == (True, cli_its.ORPHAN_NOTE)
    assert cli_its.translations_agree({"kernel": dict(miss, reason="no-ite"),
                                       "user": dict(miss, reason="device-unmapped")}) == (False, None)
    h = mapped_harness()
    a = model_snapshot(h.its)
    assert cli_its.snapshot_differences(a, a._replace(its="kernel", orphans=None)) == []
    b = a._replace(enabled=False, untargeted=(9,))
    assert cli_its.snapshot_differences(a, b) == ["GITS_CTLR.Enabled: kernel 1, user 0",
                                                  "collections without a target: kernel [], user [9]"]


def test_non_arm64_hosts_hand_over_to_the_testbed(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli_its, "needs_testbed", lambda: True)
    monkeypatch.setattr("kvmits.cli.testbed.subprocess.call", lambda cmd, cwd: calls.append(cmd) or 0)
    program = tmp_path / "p.its"
    program.write_text("MAPD 1 2\nMAPTI 1 0 8192 0\n")
    assert main(["its", "translate", "1", "0", "--program", str(program), "--its", "user", "--json", "--send"]) == 0
    (cmd,) = calls
    assert cmd[2:5] == ["run", "-q", "--"] and cmd[5:8] == ["python3", "-m", "kvmits"]
    argv = cmd[8:]
    # the file is read here: the testbed sees only the source tree
    assert argv[argv.index("--program-text") + 1] == program.read_text()
    assert argv[:4] == ["its", "translate", "1", "0"] and "--json" in argv and "user" in argv and "--send" in argv
    assert "running in the arm64 testbed" in capsys.readouterr().err


def test_a_bad_program_fails_before_any_vm(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli_its, "needs_testbed", lambda: pytest.fail("no testbed for a bad program"))
    program = tmp_path / "p.its"
    program.write_text("MAPD 1 2\nMAPTI 1 0\n")
    assert main(["its", "dump", "--program", str(program)]) == 2
    assert f"{program}:2: MAPTI takes 4 arguments, got 2" in capsys.readouterr().err
    assert main(["its", "dump", "--program", str(tmp_path / "missing.its")]) == 2
    assert main(["its", "dump", "--program", "seed:many"]) == 2


def test_what_send_reports():
    t = {"intid": 8193, "icid": 3, "vcpu": 3, "reason": "translated", "shared_with": [], "lpi_vcpu": None,
         "delivered": {"accepted": 1, "taken": [[1, 8193]]}}
    assert cli_its.format_translation("kernel", 0x42, 1, t).splitlines()[-1].split(maxsplit=1)[1] == (
        "signal_msi returned 1; the guest took LPI 8193 on vCPU 1")
    miss = {"intid": -1, "icid": -1, "vcpu": -1, "reason": "no-ite", "delivered": {"accepted": 0, "taken": []}}
    assert cli_its.format_translation("user", 0x42, 2, miss).endswith("signal_msi returned 0; the guest took nothing")


def test_send_is_refused_with_connect(capsys):
    assert main(["its", "translate", "1", "0", "--connect", "/nonexistent", "--send"]) == 2
    assert "--send needs a VM this command boots" in capsys.readouterr().err
