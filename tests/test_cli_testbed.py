"""kvmits' commands that run in the testbed on a non-arm64 host: --kernel reaches tools/testbed."""

import argparse
import platform

import pytest

from kvmits.cli import testbed
from kvmits.cli import build_parser


def test_the_kernel_goes_to_tools_testbed_before_the_command():
    cmd = testbed.testbed_command(["its", "dump"], kernel="trixie")
    assert cmd[cmd.index("run"):] == ["run", "-q", "--kernel", "trixie", "--", "python3", "-m", "kvmits", "its", "dump"]
    assert "--kernel" not in testbed.testbed_command(["demo"])
    cmd = testbed.testbed_command(["bench"], timeout=5400)
    assert cmd[cmd.index("run"):] == ["run", "-q", "--timeout", "5400", "--", "python3", "-m", "kvmits", "bench"]
    assert "--timeout" not in testbed.testbed_command(["bench"])


@pytest.mark.parametrize("argv", [["demo", "--kernel", "6.12"], ["bench", "--kernel", "6.12"],
                                  ["its", "dump", "--kernel", "6.12"], ["its", "translate", "1", "2", "--kernel", "6.12"]])
def test_the_commands_that_use_the_testbed_take_kernel(argv):
    args = build_parser().parse_args(argv)
    assert args.kernel == "6.12"


def test_kernel_is_refused_where_the_command_runs_on_the_hosts_kernel(monkeypatch, capsys):
    monkeypatch.setattr(testbed, "needs_testbed", lambda: False)
    assert testbed.kernel_refused("demo", argparse.Namespace(kernel="trixie")) == 2
    assert "host's own kernel" in capsys.readouterr().err
    assert testbed.kernel_refused("demo", argparse.Namespace(kernel=None)) is None
    monkeypatch.setattr(testbed, "needs_testbed", lambda: True)
    assert testbed.kernel_refused("demo", argparse.Namespace(kernel="trixie")) is None


@pytest.mark.skipif(platform.machine() == "aarch64", reason="on arm64 the commands run natively")
def test_demo_hands_its_kernel_to_the_testbed(monkeypatch):
    from kvmits.cli import demo

    seen = {}
    monkeypatch.setattr(demo, "run_in_testbed", lambda name, argv, kernel=None: seen.update(name=name, kernel=kernel) or 0)
    assert demo.cmd_demo(build_parser().parse_args(["demo", "--kernel", "bookworm-backports"])) == 0
    assert seen == {"name": "demo", "kernel": "bookworm-backports"}
