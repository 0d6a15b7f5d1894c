import zipfile
from pathlib import Path

import pytest

from testbed_lib import pydeps
from testbed_lib.errors import TestbedError

PYPROJECT = """\
[project]
name = "kvmits"
dependencies = [
    "fdt>=0.3.3",
    "CFFI>=1.15",
    "Some_Thing[extra]~=1.0 ; python_version >= '3.11'",
]
"""


def test_requirement_names_are_normalized():
    assert pydeps.requirement_name("Some_Thing.Else[x]>=1") == "some-thing-else"
    assert pydeps.requirement_name("fdt") == "fdt"
    with pytest.raises(TestbedError):
        pydeps.requirement_name(">=1.0")


def test_guest_requirements_leave_cffi_to_debian(fs):
    fs.create_file("/src/pyproject.toml", contents=PYPROJECT)
    assert pydeps.guest_requirements(Path("/src/pyproject.toml")) == [
        "Some_Thing[extra]~=1.0 ; python_version >= '3.11'", "fdt>=0.3.3"]


def test_guest_requirements_errors_are_clear(fs):
    fs.create_file("/src/pyproject.toml", contents="[project\n")
    with pytest.raises(TestbedError, match="cannot read the dependencies"):
        pydeps.guest_requirements(Path("/src/pyproject.toml"))


def test_real_pyproject_gives_pure_python_requirements():
    root = Path(__file__).resolve().parents[2]
    reqs = pydeps.guest_requirements(root / "pyproject.toml")
    assert all(pydeps.requirement_name(r) != "cffi" for r in reqs)


def test_pip_download_only_pure_python_wheels_for_the_guest_python():
    cmd = pydeps.pip_download_command(["py", "-m", "pip"], ["fdt>=0.3.3"], Path("/w"), "3.11")
    assert cmd[:4] == ["py", "-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in cmd
    pairs = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert pairs["--python-version"] == "3.11" and pairs["--platform"] == "any"
    assert pairs["--abi"] == "none" and pairs["--implementation"] == "py"
    assert cmd[cmd.index("-d") + 1] == "/w" and cmd[-1] == "fdt>=0.3.3"


def test_requirements_key_depends_on_both_inputs():
    k = pydeps.requirements_key(["fdt>=0.3.3"], "3.11")
    assert k == pydeps.requirements_key(["fdt>=0.3.3"], "3.11")
    assert k != pydeps.requirements_key(["fdt>=0.3.4"], "3.11")
    assert k != pydeps.requirements_key(["fdt>=0.3.3"], "3.12")


def test_fetch_wheels_uses_the_cache_without_pip(fs):
    reqs = ["fdt>=0.3.3"]
    dest = Path("/w") / pydeps.requirements_key(reqs, "3.11")
    fs.create_file(dest / "fdt-0.3.3-py3-none-any.whl")
    fs.create_file(dest / ".complete")
    never = lambda: pytest.fail("pip must not run on the cached path")  # noqa: E731
    assert pydeps.fetch_wheels(never, reqs, Path("/w"), "3.11") == [dest / "fdt-0.3.3-py3-none-any.whl"]
    assert pydeps.fetch_wheels(never, [], Path("/w"), "3.11") == []


def test_fetch_wheels_notices_a_missing_wheel(fs):
    reqs = ["fdt>=0.3.3", "other"]
    dest = Path("/w") / pydeps.requirements_key(reqs, "3.11")
    fs.create_file(dest / "fdt-0.3.3-py3-none-any.whl")
    fs.create_file(dest / ".complete")
    with pytest.raises(TestbedError, match="other"):
        pydeps.fetch_wheels(lambda: [], reqs, Path("/w"), "3.11")


def _wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def test_unpack_wheels(tmp_path):
    w = _wheel(tmp_path / "fdt-0.3.3-py3-none-any.whl",
               {"fdt/__init__.py": "x = 1\n", "fdt-0.3.3.dist-info/METADATA": "Name: fdt\n"})
    pydeps.unpack_wheels([w], tmp_path / "deps")
    assert (tmp_path / "deps/fdt/__init__.py").read_text() == "x = 1\n"
    assert (tmp_path / "deps/fdt-0.3.3.dist-info/METADATA").exists()


def test_unpack_wheels_refuses_data_directories(tmp_path):
    w = _wheel(tmp_path / "x-1-py3-none-any.whl", {"x-1.data/scripts/x": "#!/bin/sh\n"})
    with pytest.raises(TestbedError, match=".data"):
        pydeps.unpack_wheels([w], tmp_path / "deps")
