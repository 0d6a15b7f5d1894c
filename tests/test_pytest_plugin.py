"""kvmits' pytest plugin (kvmits.pytest_plugin), as a user's pytest run sees it: its options,
marker and fixtures, the per-ITS parametrization, the skips that say why, and `pip install .`
into a clean virtualenv making it available. The fixtures that boot VMs run for real in the
arm64 tests (tests/arm64 use its_kind, its_lab and arm64_kvm) and through `kvmits test`
(tests/tools/test_kvmits_through_testbed.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kvmits import pytest_plugin
from kvmits.pytest_plugin import SURFACE

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]
ON_ARM64 = platform.machine() == "aarch64"


def run(pytester, source: str, *args):
    pytester.makepyfile(test_user=source)
    return pytester.runpytest_subprocess("-p", "kvmits.pytest_plugin", "-p", "no:cacheprovider", "-v", *args)


def test_the_documented_surface_is_what_the_plugin_provides(pytester):
    help_text = pytester.runpytest_subprocess("-p", "kvmits.pytest_plugin", "--help").stdout.str()
    for option in SURFACE["options"]:
        assert option in help_text, option
    assert "kvmits: arm64 VMs with the kernel's or the userspace ITS" in help_text
    fixtures = pytester.runpytest_subprocess("-p", "kvmits.pytest_plugin", "--fixtures").stdout.str()
    for name in SURFACE["fixtures"]:
        assert f"\n{name}" in fixtures or fixtures.startswith(name), name
    markers = pytester.runpytest_subprocess("-p", "kvmits.pytest_plugin", "--markers").stdout.str()
    assert "@pytest.mark.arm64_kvm" in markers
    # the module's docstring documents each name
    for names in SURFACE.values():
        for name in names:
            assert name in pytest_plugin.__doc__, name


def test_a_test_asking_for_its_kind_runs_once_per_kind(pytester):
    result = run(pytester, "def test_k(its_kind):\n    assert its_kind in ('kernel', 'user')\n")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_k?kernel? PASSED*", "*test_k?user? PASSED*"])


def test_kvmits_its_picks_the_kinds(pytester):
    result = run(pytester, "def test_k(its_kind):\n    assert its_kind == 'user'\n", "--kvmits-its", "user")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_k?user? PASSED*"])


def test_an_unknown_kind_is_a_usage_error_naming_the_kinds(pytester):
    result = run(pytester, "def test_k(its_kind):\n    pass\n", "--kvmits-its", "kernel,hidden")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--kvmits-its: hidden is not an ITS kind; kinds: kernel, user*"])


def test_kvmits_cpus_reaches_the_fixture(pytester):
    result = run(pytester, "def test_c(kvmits_cpus):\n    assert kvmits_cpus == 7\n", "--kvmits-cpus", "7")
    result.assert_outcomes(passed=1)
    assert run(pytester, "def test_c(kvmits_cpus):\n    pass\n", "--kvmits-cpus", "0").ret == pytest.ExitCode.USAGE_ERROR


def test_an_own_parametrization_of_its_kind_is_kept(pytester):
    source = ("import pytest\n@pytest.mark.parametrize('its_kind', ['user'])\n"
              "def test_k(its_kind):\n    assert its_kind == 'user'\n")
    run(pytester, source).assert_outcomes(passed=1)


@pytest.mark.skipif(ON_ARM64, reason="checks the skips of a host without arm64 KVM")
def test_without_arm64_kvm_the_vm_fixtures_and_the_marker_skip_saying_why(pytester):
    source = ("import pytest\n"
              "def test_lab(its_lab):\n    pass\n"
              "def test_machine(arm64_machine):\n    pass\n"
              "@pytest.mark.arm64_kvm\n"
              "def test_marked():\n    pass\n"
              "def test_plain():\n    pass\n")
    result = run(pytester, source, "-rs")
    result.assert_outcomes(passed=1, skipped=5)       # lab and machine on both kinds, the marked one
    result.stdout.fnmatch_lines(["*SKIPPED*needs arm64 KVM and this host is*: run the tests with `kvmits test PATH`*"])
    result.stdout.fnmatch_lines(["*test_lab?kernel? SKIPPED*", "*test_lab?user? SKIPPED*"])


def test_the_report_header_names_the_kinds_and_where_it_runs(pytester):
    result = run(pytester, "def test_k():\n    pass\n", "--kvmits-its", "user", "--kvmits-cpus", "2")
    result.stdout.fnmatch_lines([f"kvmits: ITS kinds user, 2 vCPUs, kernel {platform.release()} on *"])


def test_pip_install_into_a_clean_virtualenv_makes_pytest_list_the_plugin(tmp_path):
    """`pip install .` (kvmits and, for pytest itself, pytest) into a new virtualenv: the entry
    point makes `pytest --help` show the plugin's options, with no -p and no conftest."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          str(ROOT), "pytest"], capture_output=True, text=True, check=False)
    if pip.returncode != 0 and "Could not find a version" in pip.stderr:
        pytest.skip(f"pip has no index with kvmits' dependencies here: {pip.stderr.strip()[-300:]}")
    assert pip.returncode == 0, pip.stderr[-2000:]
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert "--kvmits-its=KINDS" in out.stdout and "--kvmits-cpus=N" in out.stdout


@pytest.mark.skipif(ON_ARM64, reason="hands the run to the testbed only where there is no arm64 KVM")
def test_kvmits_kernel_hands_the_session_to_the_testbed_with_its_files(pytester, monkeypatch):
    from kvmits.cli.testbed import guest_path

    test = pytester.makepyfile(test_user="def test_k():\n    pass\n")
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 5)
    result = pytester.runpytest_inprocess("--kvmits-kernel", "trixie", "-x", "test_user.py", "--kvmits-its=user")
    assert result.ret == 5                                      # the testbed's status is the session's
    (cmd,) = calls
    assert cmd[cmd.index("--kernel") + 1] == "trixie"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--file"] == [str(test)]
    inner = cmd[cmd.index("--") + 1:]
    assert inner[inner.index("python3"):] == ["python3", "-m", "pytest", "-p", "kvmits.pytest_plugin", "-x",
                                              guest_path(str(test)), "--kvmits-its=user"]
    assert guest_path(str(pytester.path)) in inner                # run in the copy of the directory


@pytest.mark.skipif(not ON_ARM64, reason="an arm64 host runs on its own kernel")
def test_kvmits_kernel_is_refused_on_an_arm64_host(pytester):
    result = run(pytester, "def test_k():\n    pass\n", "--kvmits-kernel", "trixie")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
