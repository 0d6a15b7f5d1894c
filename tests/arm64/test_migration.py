"""Save/restore and migration between the two ITSes (issue 13), on the real kernel, 4 vCPUs.

Each test builds ITS state through the guest agent on one ITS kind, migrates the running guest
(kvmits.lab.ItsLab.migrate: pause, kvmits.machine.state.capture, restore into a new VM,
close the old one, resume) to a VM with the same or the other kind, and checks what the guest
sees there. All four directions; the checks are those of kvm-unit-tests' ITS migration tests
(arm/gic.c: its-migration, its-pending-migration, its-migrate-unmapped-collection) plus MOVALL
and a command queue caught mid-stream.
"""

from __future__ import annotations

import pytest

from kvmits.its import commands as cmd
from kvmits.its.registers import GITS_CREADR, GITS_CTLR, GITS_CTLR_ENABLED, GITS_CWRITER, LPI_BASE

pytestmark = pytest.mark.arm64

CPUS = 4
DEVID = 0x42
DIRECTIONS = [("kernel", "kernel"), ("kernel", "user"), ("user", "kernel"), ("user", "user")]


@pytest.fixture(params=DIRECTIONS, ids=[f"{a}-to-{b}" for a, b in DIRECTIONS])
def direction(request):
    return request.param


@pytest.fixture
def lab(arm64_kvm, direction):
    from kvmits.lab.its_lab import ItsLab

    with ItsLab(cpus=CPUS, its=direction[0]) as lab:
        lab.setup()
        yield lab


def test_mappings_deliver_to_the_same_vcpus_after_migration(lab, direction, tmp_path):
    """its-migration: every (DeviceID, EventID) delivers to the same vCPU after; the ITS's saved
    state (the table ABI) is the same before and after, through a snapshot file."""
    lab.its.mapd(DEVID, 3)
    for e in range(CPUS):
        lab.its.mapti(DEVID, e, LPI_BASE + e, e)
    for e in range(CPUS):
        assert lab.msi(DEVID, e) == 1
        lab.expect(cpu=e, intid=LPI_BASE + e)
    before = lab.its_state()
    result = lab.migrate(direction[1], path=tmp_path / "vm.snap")
    assert lab.machine.its.kind == direction[1]
    assert result["snapshot"]["file_bytes"] < lab.machine.config.mem_size // 8   # sparse
    assert result["its"] == list(direction) and result["downtime"] > 0
    assert lab.its_state() == before
    for e in range(CPUS):
        assert lab.msi(DEVID, e) == 1
        lab.expect(cpu=e, intid=LPI_BASE + e)
    lab.expect_none(0.3)


def test_lpis_left_pending_on_two_vcpus_arrive_once_each_after_migration(lab, direction):
    """its-pending-migration: LPIs pending (the guest masked) on vCPUs 1 and 2 at migration
    travel in the pending tables and are each taken once, where they were pending."""
    lab.its.mapd(DEVID, 3)
    lab.its.mapti(DEVID, 0, LPI_BASE + 1, 1)
    lab.its.mapti(DEVID, 1, LPI_BASE + 2, 2)
    lab.mask()
    assert lab.msi(DEVID, 0) == 1 and lab.msi(DEVID, 1) == 1
    lab.expect_none(0.2)
    ram = lab.machine.ram
    lab.migrate(direction[1])
    assert lab.machine.ram is ram and not ram.closed          # in process: the RAM is handed over
    assert lab.unmask() == [(1, LPI_BASE + 1), (2, LPI_BASE + 2)]
    lab.expect_none(0.3)


def test_mapti_into_an_unmapped_collection_works_once_the_destination_maps_it(lab, direction):
    """its-migrate-unmapped-collection: a MAPTI into collection 7 (unmapped) survives; MAPC on
    the destination makes it deliver; the LPI's configuration (priority, enable) came along in
    the property table: an MSI to the disabled one stays pending until it is enabled."""
    on, off = LPI_BASE + 40, LPI_BASE + 41
    lab.gic.set_lpi_config(on, enabled=True, priority=0x40)
    lab.gic.set_lpi_config(off, enabled=False)
    lab.its.mapd(DEVID, 3)
    lab.its.mapti(DEVID, 0, on, 7)
    lab.its.mapti(DEVID, 1, off, 7)
    lab.its.inv(DEVID, 0)
    lab.its.inv(DEVID, 1)
    lab.msi(DEVID, 0)
    lab.expect_none(0.2)                                     # no target yet
    lab.migrate(direction[1])
    assert lab.gic.lpi_config(on) == 0x40 | 1 and lab.gic.lpi_config(off) & 1 == 0
    lab.its.mapc(7, 3)
    lab.msi(DEVID, 0)
    lab.expect(cpu=3, intid=on)
    lab.msi(DEVID, 1)
    lab.expect_none(0.3)                                     # disabled in the property table: pending
    lab.gic.set_lpi_config(off, enabled=True)
    lab.its.inv(DEVID, 1)
    lab.expect(cpu=3, intid=off)                             # taken once enabled, once
    lab.expect_none(0.2)


def test_an_lpi_movall_moved_delivers_where_the_collection_points_after_migration(lab, direction):
    """MOVALL 1 -> 2 moves the LPI in KVM (its vgic_irq target), not the collection, which the
    saved tables carry: on every destination the LPI is where its collection (vCPU 1) points,
    as the kernel's own save/restore leaves it. Before migration it is delivered on vCPU 2."""
    lab.its.mapd(DEVID, 3)
    lab.its.mapti(DEVID, 0, LPI_BASE + 5, 1)
    lab.its.movall(1, 2)
    lab.msi(DEVID, 0)
    lab.expect(cpu=2, intid=LPI_BASE + 5)
    lab.migrate(direction[1])
    lab.msi(DEVID, 0)
    lab.expect(cpu=1, intid=LPI_BASE + 5)


def test_the_command_queue_survives_mid_stream(lab, direction):
    """Commands published while the ITS is disabled wait between CREADR and CWRITER: both
    registers survive migration, and enabling the ITS on the destination runs the commands."""
    its = lab.its
    creadr = its.read_reg(GITS_CREADR)
    assert creadr == its.cwriter != 0
    its.write_reg(GITS_CTLR, 0, 4)
    commands = [cmd.encode_mapd(DEVID, its.heap.alloc(0x1000, 0x100), 3),
                cmd.encode_mapti(DEVID, 0, LPI_BASE + 9, 2), cmd.encode_sync(2)]
    for c in commands:
        its.ram.write(its.queue + its.cwriter, c)
        its.cwriter = (its.cwriter + 32) % its.queue_size
    its.write_reg(GITS_CWRITER, its.cwriter)
    assert its.read_reg(GITS_CREADR) == creadr                  # disabled: nothing ran
    lab.migrate(direction[1])
    assert its.read_reg(GITS_CREADR) == creadr
    assert its.read_reg(GITS_CWRITER) == its.cwriter
    its.write_reg(GITS_CTLR, GITS_CTLR_ENABLED, 4)
    for _ in range(1000):
        if its.read_reg(GITS_CREADR) == its.cwriter:
            break
    assert its.read_reg(GITS_CREADR) == its.cwriter
    assert lab.msi(DEVID, 0) == 1
    lab.expect(cpu=2, intid=LPI_BASE + 9)


@pytest.mark.parametrize("dst", ["kernel", "user"])
def test_a_state_whose_its_tables_point_outside_ram_is_refused_and_nothing_runs(arm64_kvm, dst):
    """GITS_BASER0 moved beyond guest RAM: the kernel's RESTORE_TABLES refuses it (EFAULT or
    EINVAL), the model's restore_tables too; restore() names the step and builds nothing that
    runs."""
    from kvmits.lab.its_lab import ItsLab
    from kvmits.machine import Machine
    from kvmits.machine import state as machine_state

    with ItsLab(cpus=2, its="kernel") as lab:
        lab.setup()
        lab.its.mapd(DEVID, 3)
        lab.its.mapti(DEVID, 0, LPI_BASE, 1)
        with lab.machine.paused():
            saved = machine_state.capture(lab.machine)
            regs = saved.sections["its"]["registers"]
            beyond = lab.machine.memmap.ram.end + (64 << 20)
            regs["GITS_BASER0"] = (regs["GITS_BASER0"] & ~((1 << 48) - (1 << 16))) | beyond
            with pytest.raises(machine_state.MachineStateError, match="refused the restore at") as info:
                Machine.restore(saved, its=dst)
    assert ("KVM_DEV_ARM_ITS_RESTORE_TABLES" in str(info.value)) == (dst == "kernel"), info.value


def test_a_state_is_refused_for_another_vcpu_count(arm64_kvm):
    from kvmits.lab.its_lab import ItsLab
    from kvmits.machine import Machine
    from kvmits.machine import state as machine_state

    with ItsLab(cpus=2, its="kernel") as lab:
        lab.setup()
        with lab.machine.paused():
            saved = machine_state.capture(lab.machine)
            with pytest.raises(machine_state.MachineStateError, match="cpus = 2, not 4 as asked"):
                Machine.restore(saved, expect={"cpus": 4})


def test_kvmits_vm_migrate_and_save_then_run_restore(arm64_kvm, tmp_path):
    """The command line: `kvmits run --control` serves the VM; `kvmits vm migrate --its user`
    moves it live (the control socket then answers for the new VM); `kvmits vm save` writes a
    snapshot; `kvmits run --restore FILE --its kernel` resumes it in a new process."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    from kvmits.machine.agent import guest_program

    root = Path(__file__).resolve().parents[2]
    kvmits = [sys.executable, "-m", "kvmits"]
    sock, snap, sock2 = tmp_path / "vm.sock", tmp_path / "vm.snap", tmp_path / "vm2.sock"

    def ask(*argv, check=True):
        return subprocess.run([*kvmits, *argv], capture_output=True, text=True, cwd=root, timeout=300, check=check)

    def wait_for(path, proc):
        for _ in range(600):
            if path.exists() or proc.poll() is not None:
                return
            time.sleep(0.1)

    vm = subprocess.Popen([*kvmits, "run", str(guest_program("agent")), "--agent", "--cpus", "2", "--its", "kernel",
                           "--control", str(sock), "--timeout", "300"], cwd=root,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(sock, vm)
        moved = ask("vm", "migrate", "--its", "user", "--connect", str(sock), "--json")
        report = json.loads(moved.stdout)
        assert report["its"] == ["kernel", "user"] and report["downtime"] > 0
        assert list(json.loads(ask("its", "dump", "--connect", str(sock), "--json").stdout)["its"]) == ["user"]
        saved = ask("vm", "save", str(snap), "--connect", str(sock))
        assert saved.stdout.startswith(f"saved {snap}:"), saved.stdout
    finally:
        vm.terminate()
        vm.wait(60)
    assert vm.returncode == 143, vm.stderr.read()[-2000:]
    again = subprocess.Popen([*kvmits, "run", "--restore", str(snap), "--its", "kernel", "--control", str(sock2),
                              "--timeout", "300"], cwd=root, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(sock2, again)
        assert list(json.loads(ask("its", "dump", "--connect", str(sock2), "--json").stdout)["its"]) == ["kernel"]
    finally:
        again.terminate()
        again.wait(60)
    assert again.returncode == 143, again.stderr.read()[-2000:]


#: programs of the differential check migrated halfway (more: KVMITS_MIGRATE_DIFF_COUNT)
MIGRATED_PROGRAMS = int(__import__("os").environ.get("KVMITS_MIGRATE_DIFF_COUNT", "4"))


def test_differential_programs_migrated_halfway_end_as_the_kernels_own_migration(arm64_kvm):
    """The differential's programs, migrated halfway (masked, LPIs pending) and finished on the
    destination, end in the same mappings and pending LPIs in all four directions. The reference
    is kernel -> kernel, the kernel's own save/restore: an ITE whose collection is unmapped at
    migration time has no place in the table ABI, so a migrated run may differ there from an
    unmigrated one, the same way for every direction."""
    from kvmits.lab.differential import compare, compare_pending, run_program
    from kvmits.lab.its_lab import ItsLab

    with ItsLab(cpus=CPUS, its="kernel") as k, ItsLab(cpus=CPUS, its="user") as u:
        k.setup()
        u.setup()
        labs = {"kernel": k, "user": u}
        failures = []
        for seed in range(1, MIGRATED_PROGRAMS + 1):
            results = {}
            for src, dst in [("user", "user"), ("kernel", "kernel"), ("kernel", "user"), ("user", "kernel")]:
                lab = labs[src]
                probe = results[("user", "user")].orphans or () if results else None
                results[(src, dst)] = run_program(lab, seed, probe=probe, migrate_to=dst)
                if lab.mode != src:
                    lab.migrate(src)                       # back, for the next direction from src
            ref = results[("kernel", "kernel")]
            for direction, got in results.items():
                diffs = compare(ref.dump, got.dump) + compare_pending(ref.pending, got.pending)
                if diffs:
                    failures.append(f"seed {seed} {direction[0]} -> {direction[1]}: " + "; ".join(diffs[:4]))
        assert not failures, "\n".join(failures)
