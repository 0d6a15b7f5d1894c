"""`kvmits its dump` and `kvmits its translate` on arm64 KVM: for the same guest program, the
kernel's ITS (read with KVM_DEV_ARM_ITS_SAVE_TABLES) and the userspace ITS (read from the model)
give the same mappings and the same translations, and each translation is what an MSI really
does (the LPI reaches the vCPU the query named; a miss is dropped)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.arm64

CPUS = 4
ROOT = Path(__file__).resolve().parents[2]
SEEDS = range(1, 13)
#: a hand-written program: a wide device (MAPI), a re-targeted collection, an orphan, a DISCARD
PROGRAM_TEXT = """\
MAPD 0x42 4
MAPD 5 14
MAPC 6 2
MAPTI 0x42 0 8192 6
MAPTI 0x42 1 8193 1
MAPTI 0x42 2 8194 2
MAPI 5 8200 3
---
MOVI 0x42 1 3
MAPC 6 0            # re-target: event 0 follows to vCPU 0
MAPC 2 1 0          # unmap: event 2 is orphaned
DISCARD 0x42 1
"""
DEVIDS = [0, 1, 2, 3, 4, 5, 6, 0x42]
EVENTIDS = list(range(0, 34)) + list(range(8192, 8204))


@pytest.fixture(scope="module")
def labs(arm64_kvm):
    from kvmits.lab.its_lab import ItsLab

    with ItsLab(cpus=CPUS, its="kernel") as kernel, ItsLab(cpus=CPUS, its="user") as user:
        kernel.setup()
        user.setup()
        yield {"kernel": kernel, "user": user}


def programs():
    from kvmits.lab.differential import generate_program
    from kvmits.lab.its_program import demo_program, parse_program

    yield "demo", demo_program(CPUS)
    yield "text", parse_program(PROGRAM_TEXT)
    for seed in SEEDS:
        yield f"seed:{seed}", generate_program(seed, cpus=CPUS)


@pytest.mark.parametrize("name", ["demo", "text", *(f"seed:{s}" for s in SEEDS)])
def test_both_itses_dump_and_translate_the_same(labs, name):
    from kvmits.cli.its import snapshot_differences, translations_agree
    from kvmits.its.query import translation_to_json
    from kvmits.lab.its_program import ProgramRunner

    batches = dict(programs())[name]
    snaps = {}
    for mode, lab in labs.items():
        lab.reset_its()
        ProgramRunner(lab).run(batches)
        snaps[mode] = lab.snapshot()
    kernel, user = snaps["kernel"], snaps["user"]
    assert snapshot_differences(kernel, user) == []
    assert kernel.dump["devices"], "the program mapped nothing"
    assert user == labs["user"].machine.its.snapshot()          # reading the model changes nothing

    hits = []
    for devid in DEVIDS:
        for eventid in EVENTIDS:
            k = kernel.translate(devid, eventid)
            u = labs["user"].machine.its.translate(devid, eventid)     # the model, live
            agree, _ = translations_agree({"kernel": translation_to_json(k), "user": translation_to_json(u)})
            assert agree, (devid, eventid, k, u)
            if k.ok:
                hits.append((devid, eventid, k))
    assert hits
    # the kernel's query through MachineIts.translate itself (a SAVE_TABLES per call) answers the same
    devid, eventid, k = hits[0]
    assert labs["kernel"].machine.its.translate(devid, eventid) == k

    # What MSIs really do, in both ITSes: the LPI reaches the vCPU KVM has it on, which the
    # userspace ITS's hidden ITS tracks (HiddenIts.mapping): the translation's vCPU, unless
    # the LPI is shared by ITEs or was moved by MOVALL (KVM keeps one target per LPI).
    where = labs["user"].machine.its.hidden.mapping()
    unshared = [h for h in hits if kernel.lpi_users(h[2].intid) == [h[:2]]]
    time.sleep(0.2)                                  # LPIs the programs' INT commands raised
    for lab in labs.values():
        lab.agent.take_irqs()
    misses = [(d, e) for d in (0x42, 5, 7) for e in (2, 3, 31) if not kernel.translate(d, e).ok]
    # every shared or moved LPI, and a few plain ones
    sample = [h for h in hits if where[h[2].intid] != h[2].target] + unshared[:3]
    for lab in labs.values():
        for devid, eventid, k in sample:
            assert lab.msi(devid, eventid) == 1, (lab.mode, devid, eventid)
            lab.expect(cpu=where[k.intid], intid=k.intid)
        for devid, eventid in misses[:3]:
            assert lab.msi(devid, eventid) == 0, (lab.mode, devid, eventid)
    # where no LPI was ever shared or moved by MOVALL, an MSI goes where it translates
    if name in ("demo", "text"):
        assert all(where[k.intid] == k.target for _, _, k in hits)


def test_the_text_program_reads_as_written(labs):
    from kvmits.lab.its_program import ProgramRunner, parse_program

    lab = labs["user"]
    lab.reset_its()
    ProgramRunner(lab).run(parse_program(PROGRAM_TEXT))
    snap = lab.snapshot()
    assert {e: (i["intid"], i["icid"]) for e, i in snap.dump["devices"][0x42]["events"].items()} == {0: (8192, 6)}
    assert snap.dump["devices"][5]["events"] == {8200: {"icid": 3, "intid": 8200}}
    assert snap.orphans == ((0x42, 2),)
    assert [snap.translate(0x42, e).reason_name for e in range(3)] == ["translated", "no-ite", "collection-unmapped"]
    assert snap.translate(0x42, 0).target == 0


def _kvmits(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "kvmits", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)


def test_cli_dump_both_modes(arm64_kvm):
    out = _kvmits("its", "dump", "--program", "seed:5", "--cpus", "2", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["same"] is True and result["differences"] == []
    assert set(result["its"]) == {"kernel", "user"}
    kernel, user = result["its"]["kernel"], result["its"]["user"]
    assert kernel["source"].startswith("KVM_DEV_ARM_ITS_SAVE_TABLES") and kernel["orphans"] is None
    assert kernel["devices"] == user["devices"] and kernel["devices"]


def test_cli_translate_send_shows_movall_at_work(arm64_kvm):
    """The walk-through program's MOVALL 3 1: event 1 translates to vCPU 3, and both ITSes
    deliver its LPI to vCPU 1, as the userspace ITS's note says."""
    out = _kvmits("its", "translate", "0x42", "1", "--program", str(ROOT / "examples/its/walkthrough.its"),
                  "--send", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["agree"] is True
    for mode, t in result["its"].items():
        assert (t["intid"], t["vcpu"]) == (8193, 3), mode
        assert t["delivered"] == {"accepted": 1, "taken": [[1, 8193]]}, mode
    assert result["its"]["user"]["lpi_vcpu"] == 1 and result["its"]["kernel"]["lpi_vcpu"] is None


def test_cli_translate_both_modes(arm64_kvm, tmp_path):
    # the demo program: event 3 -> LPI 8195, collection 3 % 2 = 1, then MOVI to collection 0
    out = _kvmits("its", "translate", "0x42", "3", "--cpus", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "kernel ITS     DeviceID 0x42 EventID 3 -> LPI 8195 on vCPU 0 (collection 0)",
        "userspace ITS  DeviceID 0x42 EventID 3 -> LPI 8195 on vCPU 0 (collection 0)",
        "the two ITSes agree"]
    program = tmp_path / "p.its"
    program.write_text(PROGRAM_TEXT)
    out = _kvmits("its", "translate", "0x42", "2", "--program", str(program), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["agree"] is True and result["note"]           # an orphan: no-ite vs collection-unmapped
    assert {m: t["reason"] for m, t in result["its"].items()} == {"kernel": "no-ite", "user": "collection-unmapped"}


@pytest.mark.parametrize("mode", ["kernel", "user"])
def test_cli_connects_to_a_running_vm(labs, mode, tmp_path, capsys):
    from kvmits.cli import main
    from kvmits.machine.control import ControlServer, machine_handlers

    lab = labs[mode]
    lab.reset_its()
    lab.its.mapd(0x9, 2)
    lab.its.mapti(0x9, 1, 8300, 3)
    path = str(tmp_path / "vm.sock")
    with ControlServer(path, machine_handlers(lab.machine)):
        assert main(["its", "dump", "--connect", path, "--json"]) == 0
        dump = json.loads(capsys.readouterr().out)["its"][mode]
        assert dump["devices"]["9"]["events"] == {"1": {"icid": 3, "intid": 8300}}
        assert dump["collections"] == {str(c): c for c in range(CPUS)}
        assert main(["its", "translate", "9", "1", "--connect", path]) == 0
        assert capsys.readouterr().out.endswith("DeviceID 0x9 EventID 1 -> LPI 8300 on vCPU 3 (collection 3)\n")
    assert lab.msi(0x9, 1) == 1                      # the guest ran on: the pauses ended
    lab.expect(cpu=3, intid=8300)


def test_kvmits_run_serves_the_control_socket(arm64_kvm, tmp_path):
    from kvmits.machine.agent import guest_program
    from kvmits.machine.control import request

    path = str(tmp_path / "run.sock")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "kvmits", "run", str(guest_program("agent")), "--agent",
                             "--its", "user", "--cpus", "2", "--control", path, "--timeout", "120"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no control socket"
            time.sleep(0.1)
        assert request(path, "info") == {"cpus": 2, "its": "user", "pid": proc.pid}
        dump = request(path, "its-dump")
        assert dump["enabled"] is False and dump["devices"] == {}        # the agent sets up no ITS
        assert request(path, "its-translate", devid=1, eventid=0)["reason"] == "its-disabled"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err                  # SIGTERM: the VM stopped, the socket removed
    assert "terminated (SIGTERM)" in err.decode()
    assert not os.path.exists(path)
