import os
from pathlib import Path

import pytest

from testbed_lib import cli, qemu
from testbed_lib.errors import EXIT_TESTBED, EXIT_TIMEOUT


def parse(*argv, environ=None):
    return cli.parse_args(list(argv), environ or {})


def test_run_takes_everything_after_the_double_dash():
    args = parse("run", "--smp", "4", "--", "python3", "-m", "pytest", "-q", "--", "tests/arm64")
    assert args.subcommand == "run"
    assert args.command == ["python3", "-m", "pytest", "-q", "--", "tests/arm64"]
    assert args.smp == 4


def test_defaults():
    args = parse("run", "--", "true")
    assert (args.smp, args.mem, args.timeout) == (2, 2048, 1200)
    assert args.cpu == "max,pauth-impdef=on"
    assert not args.nvhe and not args.quiet and not args.no_make and not args.refresh
    assert args.env == [] and args.append == ""


def test_environment_sets_the_defaults_and_options_win():
    env = {"KVMITS_TESTBED_SMP": "1", "KVMITS_TESTBED_MEM": "4096", "KVMITS_TESTBED_TIMEOUT": "60"}
    args = parse("probe", environ=env)
    assert (args.smp, args.mem, args.timeout) == (1, 4096, 60)
    args = parse("probe", "--mem", "1024", environ=env)
    assert args.mem == 1024


def test_bad_environment_default_is_refused():
    with pytest.raises(SystemExit, match="KVMITS_TESTBED_MEM"):
        parse("probe", environ={"KVMITS_TESTBED_MEM": "lots"})


@pytest.mark.parametrize("argv", [
    ["run"],                                  # no command
    ["run", "true"],                          # command without --
    ["run", "--"],                            # empty command
    ["build", "--", "true"],                  # build takes no command
    ["run", "--smp", "0", "--", "true"],      # not positive
    ["run", "--env", "1X=y", "--", "true"],   # bad variable name
    ["frobnicate"],
    [],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2


def test_probe_runs_the_probe_script_from_the_source_copy():
    args = parse("probe", "--nvhe")
    assert args.command == cli.PROBE_COMMAND
    assert (Path(cli.__file__).parents[1] / args.command[-1].removeprefix("tools/")).is_file()


def test_boot_config_carries_the_options_to_qemu():
    args = parse("run", "--nvhe", "--smp", "3", "--mem", "1024", "--append", "foo=1", "--timeout", "9",
                 "-q", "--", "true")
    cfg = cli.boot_config(args)
    assert cfg == qemu.BootConfig(smp=3, mem=1024, nvhe=True, append="foo=1", timeout=9, quiet=True)
    line = qemu.kernel_cmdline(cfg, "tok")
    assert "kvm-arm.mode=nvhe" in line.split() and "foo=1" in line.split()


def result(**kw):
    base = dict(status=None, timed_out=False, qemu_status=0, booted_after=2.0, seconds=5.0, tail=[])
    base.update(kw)
    return qemu.BootResult(**base)


def test_verdict_passes_the_command_status_through():
    for status in (0, 1, 124, 125, 255):
        code, msg = cli.verdict_of(result(status=status), 60, Path("/log"))
        assert code == status and f"status {status}" in msg


def test_verdict_on_timeout():
    code, msg = cli.verdict_of(result(timed_out=True, qemu_status=None), 60, Path("/x.log"))
    assert code == EXIT_TIMEOUT == 124
    assert "time limit of 60s" in msg and "while the command ran" in msg and "/x.log" in msg
    code, msg = cli.verdict_of(result(timed_out=True, booted_after=None), 60, Path("/x.log"))
    assert code == 124 and "before the guest finished booting" in msg


def test_verdict_when_the_guest_never_reported():
    code, msg = cli.verdict_of(result(tail=["a", "b"], panic="Kernel panic - not syncing: x"),
                               60, Path("/x.log"))
    assert code == EXIT_TESTBED == 125
    assert "without reporting an exit status" in msg and "Kernel panic - not syncing: x" in msg
    assert "    a\n    b" in msg


def test_new_log_keeps_the_newest(fs):
    layout = cli.Layout(Path("/cache/testbed"))
    layout.logs.mkdir(parents=True)
    for i in range(cli.LOG_KEEP + 5):
        (layout.logs / f"20260101-0000{i:02d}-1-run.log").write_text("x")
    path = cli.new_log(layout, "probe")
    path.write_text("new")
    logs = sorted(layout.logs.glob("*.log"))
    assert len(logs) == cli.LOG_KEEP
    assert path in logs and layout.logs / "20260101-000000-1-run.log" not in logs


def test_prune_runs_removes_only_old_scratch(fs):
    layout = cli.Layout(Path("/cache/testbed"))
    fs.create_file(layout.runs / "run-old" / "initrd")
    fs.create_file(layout.runs / "run-live" / "initrd")
    os.utime(layout.runs / "run-old", (1000, 1000))
    os.utime(layout.runs / "run-live", (1000 + cli.RUN_DIR_MAX_AGE, 1000 + cli.RUN_DIR_MAX_AGE))
    cli.prune_runs(layout, now=1000 + cli.RUN_DIR_MAX_AGE + 10)
    assert [d.name for d in layout.runs.iterdir()] == ["run-live"]
    cli.prune_runs(cli.Layout(Path("/nothing/here")), now=0)  # no runs/ yet: nothing to do


def test_verdict_when_qemu_itself_failed():
    code, msg = cli.verdict_of(result(qemu_status=1, booted_after=None,
                                      tail=["qemu-system-aarch64: unable to find CPU model 'x'"]),
                               60, Path("/x.log"))
    assert code == 125 and msg.startswith("qemu failed with exit status 1")
    assert "unable to find CPU model" in msg
