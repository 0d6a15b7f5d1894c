"""kvmits' pytest plugin: users' own arm64 VM bring-up tests, run on each ITS (docs/writing-tests.md).

Installed with kvmits (the `pytest11` entry point), so `pip install kvmits` makes it available
to every pytest run; our own tests load it the same way (tests/conftest.py). Its surface, which
stays stable (kvmits.pytest_plugin.SURFACE lists it):

Options
  --kvmits-its KINDS   the ITS kinds to run each test on, comma-separated (default kernel,user)
  --kvmits-cpus N      the vCPUs of the fixtures' machines (default 4)
  --kvmits-kernel K    on a host without arm64 KVM: run the whole session inside the arm64
                       testbed on guest kernel K (a tools/testbed --kernel value: bookworm,
                       trixie, a version, an Image), as `kvmits test --kernel K` does; refused
                       on an arm64 KVM host, where the tests run on the host's own kernel

Marker
  @pytest.mark.arm64_kvm   the test needs arm64 KVM: it is skipped, saying why, where there is
                           none (any test using the fixtures below is too)

Fixtures
  its_kind        "kernel" or "user": each test that uses it (or a fixture below) runs once per
                  kind of --kvmits-its, with the kind in its id (test_x[kernel], test_x[user])
  kvmits_cpus     the vCPU count of --kvmits-cpus
  arm64_kvm       nothing; skips the test where arm64 KVM is not available
  arm64_machine   a kvmits.machine.Machine with kvmits_cpus vCPUs and the its_kind ITS, neither
                  loaded nor started; closed after the test; its console's bytes so far are
                  arm64_machine.uart.out.getvalue()
  its_lab         a kvmits.lab.its_lab.ItsLab: the guest agent online on every vCPU, the guest's
                  LPIs and ITS set up (tables, command queue, ICID n -> vCPU n); one per test
                  module and ITS kind (tests of a module share it: map DeviceIDs of your own)

The lab's surface for tests (ItsLab): .its (the guest's ITS driver: mapd, mapti, mapi, movi,
movall, int_, clear, inv, invall, discard, sync, submit), .gic (set_lpi_config), .msi(devid,
eventid), .routes(table) -> EventFds, .expect(cpu=, intid=), .expect_none(), .snapshot(),
.its_tables(), .machine (the Machine), .agent.

`kvmits test PATH...` runs test files with this plugin natively on an arm64 KVM host and inside
the arm64 testbed elsewhere.
"""

from __future__ import annotations

import os
import platform

import pytest

ITS_KINDS_DEFAULT = "kernel,user"
CPUS_DEFAULT = 4
#: the documented names; tests/lab/test_pytest_plugin.py checks the plugin provides exactly these
SURFACE = {
    "options": ("--kvmits-its", "--kvmits-cpus", "--kvmits-kernel"),
    "markers": ("arm64_kvm",),
    "fixtures": ("its_kind", "kvmits_cpus", "arm64_kvm", "arm64_machine", "its_lab"),
}


def pytest_addoption(parser) -> None:
    group = parser.getgroup("kvmits", "kvmits: arm64 VMs with the kernel's or the userspace ITS")
    group.addoption("--kvmits-its", default=ITS_KINDS_DEFAULT, metavar="KINDS",
                    help="ITS kinds each kvmits test runs on, comma-separated: kernel, user (default: %(default)s)")
    group.addoption("--kvmits-cpus", type=int, default=CPUS_DEFAULT, metavar="N",
                    help="vCPUs of the kvmits fixtures' machines (default: %(default)s)")
    group.addoption("--kvmits-kernel", default=None, metavar="K",
                    help="on a host without arm64 KVM: run the session in the arm64 testbed on guest kernel K "
                         "(bookworm, trixie, a version, an Image: tools/testbed --kernel)")


def _in_testbed() -> bool:
    return os.environ.get("KVMITS_TESTBED") == "1"


def pytest_cmdline_main(config):
    """--kvmits-kernel on a host without arm64 KVM: this pytest run, inside the testbed."""
    kernel = config.getoption("--kvmits-kernel")
    if kernel is None or _in_testbed():
        return None
    if platform.machine() == "aarch64":
        raise pytest.UsageError(f"--kvmits-kernel chooses the testbed's kernel; on this arm64 host the tests run on "
                                f"the host's own kernel ({platform.release()})")
    return _run_in_testbed(config, kernel)


def _run_in_testbed(config, kernel: str) -> int:
    import subprocess

    from kvmits.cli.test import carried
    from kvmits.cli.testbed import guest_path, testbed_files_command

    args, skip = [], False
    for token in config.invocation_params.args:
        if skip:
            skip = False
        elif token == "--kvmits-kernel":
            skip = True
        elif not token.startswith("--kvmits-kernel="):
            args.append(token)
    base = str(config.invocation_params.dir)
    paths = [a for a in args if not a.startswith("-") and os.path.exists(os.path.join(base, a.split("::")[0]))]
    files = carried([os.path.join(base, p.split("::")[0]) for p in paths], [])
    inner = [guest_path(os.path.join(base, a), base) if a in paths else a for a in args]
    if not paths:
        files, inner = carried([base], []), inner      # pytest's own discovery from the directory
    cmd = testbed_files_command(["python3", "-m", "pytest", "-p", "kvmits.pytest_plugin", *inner], files,
                                cwd=guest_path(base), kernel=kernel)
    if cmd is None:
        raise pytest.UsageError("--kvmits-kernel needs the arm64 testbed of a kvmits source tree (tools/testbed), "
                                "which this installation does not have")
    print(f"kvmits: no arm64 KVM here: running this session in the arm64 testbed on --kernel {kernel} ...",
          flush=True)
    return subprocess.call(cmd)


def its_kinds(config) -> list[str]:
    """The kinds --kvmits-its names; pytest.UsageError for one kvmits does not have."""
    from kvmits.machine import ITS_KINDS

    kinds = [k.strip() for k in config.getoption("--kvmits-its").split(",") if k.strip()]
    bad = [k for k in kinds if k not in ITS_KINDS]
    if bad or not kinds:
        raise pytest.UsageError(f"--kvmits-its: {', '.join(bad) or 'nothing'} is not an ITS kind; "
                                f"kinds: {', '.join(ITS_KINDS)}")
    return kinds


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "arm64_kvm: needs arm64 KVM (natively, or inside the kvmits testbed); "
                                       "skipped, saying why, elsewhere")
    # its_kind is parametrized by the kinds of --kvmits-its, known only now: the fixture is
    # made here, as fixture params (not per-test parametrization), so that a module-scoped
    # its_lab is made once per module and kind and shared by the module's tests
    config.pluginmanager.register(_ItsKinds(its_kinds(config)), "kvmits-its-kinds")
    if config.getoption("--kvmits-cpus") < 1:
        raise pytest.UsageError(f"--kvmits-cpus: at least 1, not {config.getoption('--kvmits-cpus')}")


def _ItsKinds(kinds: list[str]):
    """A plugin object with the its_kind fixture, parametrized over `kinds`."""

    class ItsKinds:
        @pytest.fixture(scope="module", params=kinds)
        def its_kind(self, request) -> str:
            return request.param

    return ItsKinds()


def pytest_report_header(config) -> str:
    where = "the kvmits testbed (emulated)" if os.environ.get("KVMITS_TESTBED") == "1" else platform.machine()
    reason = arm64_kvm_unavailable_reason()
    kvm = "arm64 KVM available" if reason is None else f"no arm64 KVM: {reason}"
    return (f"kvmits: ITS kinds {','.join(its_kinds(config))}, {config.getoption('--kvmits-cpus')} vCPUs, "
            f"kernel {platform.release()} on {where}; {kvm}")


def kvm_unavailable_reason() -> str | None:
    """None if /dev/kvm can be opened here, else the reason in plain words."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host (KVM module not loaded, or no hardware virtualization)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user (add it to the 'kvm' group)"
    return None


def arm64_kvm_unavailable_reason() -> str | None:
    """None if arm64 KVM VMs can run here (natively, or inside the testbed), else why not."""
    if platform.machine() != "aarch64":
        return (f"needs arm64 KVM and this host is {platform.machine()}: run the tests with `kvmits test PATH`, "
                "which runs them inside the arm64 testbed")
    return kvm_unavailable_reason()


def pytest_collection_modifyitems(config, items) -> None:
    reason = arm64_kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("arm64_kvm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kvmits_cpus(pytestconfig) -> int:
    return pytestconfig.getoption("--kvmits-cpus")


@pytest.fixture(scope="module")
def arm64_kvm() -> None:
    """Skip (saying why) unless arm64 KVM VMs can run here."""
    reason = arm64_kvm_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def arm64_machine(arm64_kvm, its_kind, kvmits_cpus):
    from kvmits.machine import Machine, MachineConfig

    import io

    machine = Machine(MachineConfig(cpus=kvmits_cpus, its=its_kind), console=io.BytesIO())
    try:
        yield machine
    finally:
        machine.close()


@pytest.fixture(scope="module")
def its_lab(arm64_kvm, its_kind, kvmits_cpus):
    from kvmits.lab.its_lab import ItsLab

    with ItsLab(cpus=kvmits_cpus, its=its_kind) as lab:
        lab.setup()
        yield lab
