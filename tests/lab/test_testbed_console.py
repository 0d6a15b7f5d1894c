"""kvmits.lab.testbed_console: the running marker the testbed pins a kernel fault on."""

import pytest

from kvmits.lab.testbed_console import RUNNING, TestbedConsole


def _files(tmp_path, cmdline="console=ttyAMA0 kvmits.token=abc123 quiet"):
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "console").write_text("")
    return str(tmp_path / "cmdline"), str(tmp_path / "console")


def test_outside_the_testbed_nothing_is_written(tmp_path):
    cmdline, console = _files(tmp_path)
    c = TestbedConsole(environ={}, cmdline=cmdline, console=console)
    c.running("tests/x.py::test_a")
    assert not c.active and c.problem is None
    assert (tmp_path / "console").read_text() == ""


def test_in_the_testbed_a_marker_line_carries_the_token(tmp_path):
    cmdline, console = _files(tmp_path)
    c = TestbedConsole(environ={"KVMITS_TESTBED": "1"}, cmdline=cmdline, console=console)
    c.running("guest-fuzz:its=kernel:seed=7")
    c.running("guest-fuzz:its=kernel:seed=8")
    c.close()
    assert (tmp_path / "console").read_text() == (f"{RUNNING} abc123 guest-fuzz:its=kernel:seed=7\n"
                                                   f"{RUNNING} abc123 guest-fuzz:its=kernel:seed=8\n")
    with pytest.raises(ValueError):
        TestbedConsole(environ={"KVMITS_TESTBED": "1"}, cmdline=cmdline, console=console).running("a\nb")


def test_no_token_is_a_problem_not_an_error(tmp_path):
    cmdline, console = _files(tmp_path, "console=ttyAMA0")
    c = TestbedConsole(environ={"KVMITS_TESTBED": "1"}, cmdline=cmdline, console=console)
    assert not c.active and "StopIteration" in c.problem
    c.running("anything")       # a no-op
