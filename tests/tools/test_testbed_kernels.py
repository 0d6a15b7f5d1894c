"""--kernel: classifying K, Debian versions, apt's answers (recorded, no network), the choice,
the kernel cache and the modules archive."""

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

from testbed_lib import cli, kernels
from testbed_lib.apt import Deb, PrivateApt
from testbed_lib.errors import TestbedError
from testbed_lib.kernels import Candidate, KernelSpec
from testbed_lib.paths import Layout

from .newc_reader import read_archives

# `apt-cache madison linux-image-arm64` and `apt-cache show linux-image-arm64` (trimmed) as the
# private apts printed them on 2026-12-02.
MADISON_TRIXIE = """\
linux-image-arm64 | 6.12.118-1 | http://deb.debian.org/debian-security trixie-security/main arm64 Packages
linux-image-arm64 | 6.12.117-1 | http://deb.debian.org/debian trixie/main arm64 Packages
"""
SHOW_TRIXIE = """\
Package: linux-image-arm64
Source: linux-signed-arm64 (6.12.118+1)
Version: 6.12.118-1
Installed-Size: 14
Maintainer: Debian Kernel Team <debian-kernel@lists.debian.org>
Architecture: arm64
Depends: linux-image-6.12.118+deb13-arm64 (= 6.12.118-1)
Description: Linux for 64-bit ARMv8 machines (meta-package)
Description-md5: 4dc3e1f1a0c3f15c0e9a5d2f1a2b2a90

Package: linux-image-arm64
Source: linux-signed-arm64 (6.12.117+1)
Version: 6.12.117-1
Architecture: arm64
Depends: linux-image-6.12.117+deb13-arm64 (= 6.12.117-1)
Description: Linux for 64-bit ARMv8 machines (meta-package)

"""
MADISON_BPO = ("linux-image-arm64 | 6.12.95-1~bpo12+1 | http://deb.debian.org/debian "
               "bookworm-backports/main arm64 Packages\n")
SHOW_BPO = """\
Package: linux-image-arm64
Version: 6.12.95-1~bpo12+1
Depends: linux-image-6.12.95+deb12-arm64 (= 6.12.95-1~bpo12+1)
"""
MADISON_BOOKWORM = """\
linux-image-arm64 | 6.1.192-3 | http://deb.debian.org/debian-security bookworm-security/main arm64 Packages
linux-image-arm64 | 6.1.158-1 | http://deb.debian.org/debian bookworm/main arm64 Packages
"""
SHOW_BOOKWORM = """\
Package: linux-image-arm64
Version: 6.1.158-1
Depends: linux-image-6.1.0-41-arm64 (= 6.1.158-1)

Package: linux-image-arm64
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-arm64 (= 6.1.192-3)
"""
MADISON_SID = "linux-image-arm64 |   7.2.13-1 | http://deb.debian.org/debian sid/main arm64 Packages\n"
SHOW_SID = "Package: linux-image-arm64\nVersion: 7.2.13-1\nDepends: linux-image-7.2.13+deb14-arm64 (= 7.2.13-1)\n"


def tables():
    return {
        "bookworm": kernels.candidates("bookworm", MADISON_BOOKWORM, SHOW_BOOKWORM),
        "bookworm-backports": kernels.candidates("bookworm-backports", MADISON_BPO, SHOW_BPO),
        "trixie": kernels.candidates("trixie", MADISON_TRIXIE, SHOW_TRIXIE),
        "trixie-backports": [],
        "sid": kernels.candidates("sid", MADISON_SID, SHOW_SID),
    }


# --- K -------------------------------------------------------------------------------------

def test_suites_and_versions_are_recognised():
    for suite in ("bookworm", "bookworm-backports", "trixie", "trixie-backports", "sid"):
        assert kernels.parse_spec(suite, exists=lambda p: False) == KernelSpec("suite", suite)
    for version in ("6.12", "6.12.57", "6.1", "6.12.95-1~bpo12+1", "7"):
        assert kernels.parse_spec(version, exists=lambda p: True) == KernelSpec("version", version)
    assert kernels.parse_spec("bookworm").is_default and not kernels.parse_spec("trixie").is_default


def test_paths_are_made_absolute_and_a_deb_is_told_apart():
    exists = lambda p: True  # noqa: E731
    assert kernels.parse_spec("build/Image", exists=exists, cwd="/src") == KernelSpec("image", "/src/build/Image")
    assert kernels.parse_spec("../linux-image-6.13.0_1_arm64.deb", exists=exists, cwd="/src/linux") == \
        KernelSpec("deb", "/src/linux-image-6.13.0_1_arm64.deb")
    spec = kernels.parse_spec("/k/Image", "mods", exists=exists, cwd="/w")
    assert spec == KernelSpec("image", "/k/Image", "/w/mods")
    # a file named like a version needs a path
    assert kernels.parse_spec("./6.12", exists=exists, cwd="/w").kind == "image"


def test_bad_k_names_what_was_looked_for():
    with pytest.raises(ValueError, match=r"not a Debian suite \(bookworm, bookworm-backports, trixie, "
                                         r"trixie-backports, sid\), not a kernel version"):
        kernels.parse_spec("bokworm", exists=lambda p: False)
    with pytest.raises(ValueError, match=r"no such file \(/w/out/Image\)"):
        kernels.parse_spec("out/Image", exists=lambda p: False, cwd="/w")
    with pytest.raises(ValueError, match="--modules goes with a kernel file"):
        kernels.parse_spec("trixie", "/m", exists=lambda p: True)
    with pytest.raises(ValueError, match=r"--modules mods: no such directory \(/w/mods\)"):
        kernels.parse_spec("/k/Image", "mods", exists=lambda p: p == "/k/Image", cwd="/w")
    with pytest.raises(ValueError, match="empty"):
        kernels.parse_spec("")


def test_command_line_and_environment(tmp_path, capsys):
    args = cli.parse_args(["probe"], {})
    assert args.kernel_spec == kernels.DEFAULT
    args = cli.parse_args(["run", "--kernel", "trixie", "--", "true"], {"KVMITS_TESTBED_KERNEL": "6.1"})
    assert args.kernel_spec == KernelSpec("suite", "trixie")        # the option wins
    args = cli.parse_args(["build"], {"KVMITS_TESTBED_KERNEL": "6.12"})
    assert args.kernel_spec == KernelSpec("version", "6.12")
    image = tmp_path / "Image"
    image.write_bytes(b"x")
    args = cli.parse_args(["run", f"--kernel={image}", "--modules", str(tmp_path), "--", "true"], {})
    assert args.kernel_spec == KernelSpec("image", str(image), str(tmp_path))
    # the command after -- is not the testbed's: its --kernel is not ours
    args = cli.parse_args(["run", "--", "echo", "--kernel", "nonsense"], {})
    assert args.kernel_spec.is_default and args.command == ["echo", "--kernel", "nonsense"]


@pytest.mark.parametrize("argv, env, message", [
    (["probe", "--kernel", "bokworm"], {}, "not a Debian suite"),
    (["probe", "--kernel", "/no/such/Image"], {}, "no such file"),
    (["probe"], {"KVMITS_TESTBED_KERNEL": "bokworm"}, "(from KVMITS_TESTBED_KERNEL)"),
    (["probe", "--modules", "/tmp"], {}, "--modules goes with a kernel file"),
])
def test_bad_kernel_on_the_command_line_exits_2(argv, env, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv, env)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# --- Debian versions -----------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    ("6.1.158-1", "6.1.192-3"),
    ("6.1.192-3", "6.12.57-1"),
    ("6.12.95-1~bpo12+1", "6.12.95-1"),     # a backport sorts before the release it is of
    ("6.12.117-1", "6.12.118-1"),
    ("6.12.118-1", "1:5.0-1"),              # the epoch first
    ("1.0~rc1-1", "1.0-1"),                 # '~' before the end
    ("1.0-1", "1.0a-1"),                    # the end before a letter
    ("1.0a-1", "1.0+-1"),                   # letters before other characters
    ("2.36-9", "2.36-9+deb12u14"),
    ("9", "10"),                            # digit runs compare as numbers
])
def test_compare_versions(a, b):
    assert kernels.compare_versions(a, b) == -1
    assert kernels.compare_versions(b, a) == 1
    assert kernels.compare_versions(a, a) == 0


def test_version_prefix_stops_at_a_component_boundary():
    assert kernels.version_matches("6.1.158-1", "6.1")
    assert not kernels.version_matches("6.12.57-1", "6.1")
    assert kernels.version_matches("6.12.57-1", "6.12.5") is False
    assert kernels.version_matches("6.12.57-1", "6.12.57")
    assert kernels.version_matches("6.12.95-1~bpo12+1", "6.12.95-1")
    assert kernels.version_matches("6.12.95-1~bpo12+1", "6.12.95-1~bpo12+1")


# --- apt's answers, the choice -------------------------------------------------------------

def test_parse_madison_and_show():
    assert kernels.parse_madison(MADISON_TRIXIE + "other-pkg | 1 | x y\n") == \
        [("6.12.118-1", "trixie-security"), ("6.12.117-1", "trixie")]
    assert kernels.parse_madison(MADISON_SID) == [("7.2.13-1", "sid")]
    assert kernels.parse_show(SHOW_TRIXIE) == {"6.12.118-1": "linux-image-6.12.118+deb13-arm64",
                                               "6.12.117-1": "linux-image-6.12.117+deb13-arm64"}


def test_candidates_are_newest_first_whatever_apt_order():
    found = kernels.candidates("bookworm", MADISON_BOOKWORM, SHOW_BOOKWORM)
    assert [(c.version, c.package, c.archive) for c in found] == [
        ("6.1.192-3", "linux-image-6.1.0-57-arm64", "bookworm-security"),
        ("6.1.158-1", "linux-image-6.1.0-41-arm64", "bookworm")]
    # a version madison lists but show has no Depends for is left out, not guessed
    assert kernels.candidates("trixie", MADISON_TRIXIE, SHOW_BPO) == []


def test_choose_by_suite_and_by_version():
    t = tables()
    assert kernels.choose(KernelSpec("suite", "trixie"), t).describe() == \
        "linux-image-6.12.118+deb13-arm64=6.12.118-1 (trixie, from trixie-security)"
    assert kernels.choose(KernelSpec("suite", "bookworm-backports"), t).describe() == \
        "linux-image-6.12.95+deb12-arm64=6.12.95-1~bpo12+1 (bookworm-backports)"
    assert kernels.choose(KernelSpec("version", "6.12"), t).version == "6.12.118-1"
    assert kernels.choose(KernelSpec("version", "6.12.95"), t).suite == "bookworm-backports"
    assert kernels.choose(KernelSpec("version", "6.12.117"), t).package == "linux-image-6.12.117+deb13-arm64"
    assert kernels.choose(KernelSpec("version", "6.1"), t).version == "6.1.192-3"
    assert kernels.choose(KernelSpec("version", "6.1.158"), t).package == "linux-image-6.1.0-41-arm64"
    assert kernels.choose(KernelSpec("version", "7"), t).suite == "sid"


def test_choose_says_what_exists_when_nothing_matches():
    with pytest.raises(TestbedError) as exc:
        kernels.choose(KernelSpec("version", "6.13"), tables())
    msg = str(exc.value)
    assert exc.value.status == 125
    assert "no linux-image-arm64 version starting with 6.13" in msg
    assert "trixie: 6.12.118-1, 6.12.117-1" in msg and "trixie-backports: none" in msg
    with pytest.raises(TestbedError, match="have no linux-image-arm64"):
        kernels.choose(KernelSpec("suite", "trixie-backports"), tables())


def test_equal_versions_prefer_the_first_known_suite():
    same = {"trixie": [Candidate("trixie", "trixie", "6.12.1-1", "a")],
            "sid": [Candidate("sid", "sid", "6.12.1-1", "b")]}
    assert kernels.choose(KernelSpec("version", "6.12"), same).suite == "trixie"


def test_suite_apt_reads_only_its_own_sources(fs):
    layout = Layout(Path("/c/testbed"))
    apt = kernels.suite_apt(layout, "trixie")
    opts = apt.options()
    pairs = dict(opts[i + 1].split("=", 1) for i, o in enumerate(opts) if o == "-o")
    assert pairs["Dir::Etc::sourcelist"] == "/c/testbed/suites/trixie/sources.list"
    assert pairs["Dir::Etc::sourceparts"] == "/c/testbed/suites/trixie/sources.list.d"
    assert pairs["Dir::State::Lists"] == "/c/testbed/suites/trixie/lists"
    apt.prepare()
    assert apt.sourcelist.read_text().splitlines() == [
        f"deb [signed-by={kernels.KEYRING}] http://deb.debian.org/debian trixie main",
        f"deb [signed-by={kernels.KEYRING}] http://deb.debian.org/debian trixie-updates main",
        f"deb [signed-by={kernels.KEYRING}] http://deb.debian.org/debian-security trixie-security main"]
    assert list(apt.sourceparts.iterdir()) == []
    # the host-sources apt (the root file system's) has no such options
    host_opts = PrivateApt(layout.apt).options()
    assert not any("Dir::Etc" in o for o in host_opts)


def test_changed_sources_invalidate_the_lists(fs):
    apt = PrivateApt(Path("/c/s"), ["deb x a main"])
    apt.prepare()
    apt.stamp.write_text("")
    apt.prepare()
    assert apt.stamp.exists()                 # same sources: lists stay
    PrivateApt(Path("/c/s"), ["deb x b main"]).prepare()
    assert not apt.stamp.exists()             # other sources: update before use


class FakeSuiteApt:
    def __init__(self, root, madison, show):
        self.root = Path(root)
        self.stamp = self.root / "lists.stamp"
        self.answers = {"madison": madison, "show": show}
        self.updates = 0
        self.queries = []

    def prepare(self):
        self.root.mkdir(parents=True, exist_ok=True)

    def update(self):
        self.updates += 1
        self.stamp.write_text(str(self.updates))

    def lists_version(self):
        return self.stamp.stat().st_mtime_ns + int(self.stamp.read_text())

    def query(self, what, package):
        self.queries.append(what)
        return self.answers[what]


def test_suite_table_is_remembered_per_lists_version(fs):
    apt = FakeSuiteApt("/c/suites/trixie", MADISON_TRIXIE, SHOW_TRIXIE)
    first = kernels.suite_table(apt, "trixie", refresh=False)
    assert first[0].version == "6.12.118-1" and apt.updates == 1 and apt.queries == ["madison", "show"]
    assert kernels.suite_table(apt, "trixie", refresh=False) == first
    assert apt.updates == 1 and len(apt.queries) == 2       # cached: no apt at all
    kernels.suite_table(apt, "trixie", refresh=True)
    assert apt.updates == 2 and len(apt.queries) == 4


# --- the kernel cache ----------------------------------------------------------------------

def image_bytes(body=b"") -> bytes:
    head = bytearray(0x40)
    head[0x38:0x3C] = kernels.ARM64_MAGIC
    return bytes(head) + body


def test_check_image(tmp_path):
    p = tmp_path / "Image"
    p.write_bytes(image_bytes(b"code"))
    assert kernels.check_image(p) == "Image"
    p.write_bytes(gzip.compress(image_bytes()))
    assert kernels.check_image(p) == "gzip'ed Image"
    p.write_bytes(b"MZ\0\0zimg" + bytes(0x40))
    with pytest.raises(TestbedError, match="EFI zboot"):
        kernels.check_image(p)
    p.write_bytes(b"\x7fELF" + bytes(0x40))   # vmlinux, not Image
    with pytest.raises(TestbedError, match="not an arm64 kernel Image"):
        kernels.check_image(p)


def test_debian_key_and_default_description():
    assert kernels.debian_key(Deb("linux-image-6.12.118+deb13-arm64", "6.12.118-1", "arm64")) == \
        "linux-image-6.12.118+deb13-arm64_6.12.118-1"
    assert kernels.debian_key(Deb("k", "1:2-3", "arm64")) == "k_1%3a2-3"
    stamp = {"kernel": "linux-image-6.1.0-57-arm64=6.1.192-3:arm64"}
    assert kernels.default_description(stamp) == "linux-image-6.1.0-57-arm64=6.1.192-3 (bookworm)"


def test_default_kernel_is_the_images(tmp_path):
    layout = Layout(tmp_path)
    k = kernels.ensure_kernel(layout, kernels.DEFAULT, {"kernel": "linux-image-6.1.0-57-arm64=6.1.192-3:arm64"})
    assert k.vmlinuz == layout.kernel and k.modules_cpio is None and k.key == "default"
    assert not layout.kernels.exists()


def test_user_image_is_cached_by_its_sha256(tmp_path):
    layout = Layout(tmp_path / "cache")
    image = tmp_path / "Image"
    image.write_bytes(image_bytes(b"one"))
    spec = KernelSpec("image", str(image))
    k = kernels.ensure_kernel(layout, spec, {})
    sha = kernels.file_sha256(image)
    assert k.key == f"image-{sha[:16]}" and k.vmlinuz.read_bytes() == image.read_bytes()
    assert k.description == f"user Image {image} sha256:{sha[:16]}" and k.modules_cpio is None
    image.write_bytes(image_bytes(b"two"))    # rebuilt: another key, the copy is unchanged
    k2 = kernels.ensure_kernel(layout, spec, {})
    assert k2.key != k.key and k.vmlinuz.read_bytes().endswith(b"one")
    assert kernels.ensure_kernel(layout, spec, {}) == k2       # found again, not remade


def write_modules(root: Path, release: str) -> Path:
    tree = root / "lib" / "modules" / release
    (tree / "kernel" / "drivers").mkdir(parents=True)
    (tree / "kernel" / "drivers" / "dummy.ko").write_bytes(b"\x7fELF module")
    (tree / "modules.dep").write_text("kernel/drivers/dummy.ko:\n")
    (tree / "build").symlink_to("/usr/src/linux")
    return tree


def test_modules_tree_finds_the_release(tmp_path):
    tree = write_modules(tmp_path / "inst", "6.13.0-rc1")
    assert kernels.modules_tree(str(tree)) == ("6.13.0-rc1", tree)
    assert kernels.modules_tree(str(tmp_path / "inst")) == ("6.13.0-rc1", tree)
    write_modules(tmp_path / "inst", "6.14.0")
    with pytest.raises(TestbedError, match="exactly one"):
        kernels.modules_tree(str(tmp_path / "inst"))
    with pytest.raises(TestbedError, match="not a directory"):
        kernels.modules_tree(str(tmp_path / "nothing"))


def test_user_image_with_modules_packs_them_at_lib_modules(tmp_path):
    layout = Layout(tmp_path / "cache")
    image = tmp_path / "Image"
    image.write_bytes(image_bytes())
    write_modules(tmp_path / "inst", "6.13.0")
    spec = KernelSpec("image", str(image), str(tmp_path / "inst"))
    k = kernels.ensure_kernel(layout, spec, {})
    assert "-modules-" in k.key and k.description.endswith(
        f", modules 6.13.0 from {tmp_path / 'inst/lib/modules/6.13.0'}")
    [entries] = read_archives(k.modules_cpio.read_bytes())
    by_name = {e.name: e for e in entries}
    assert list(by_name)[:3] == ["lib", "lib/modules", "lib/modules/6.13.0"]
    assert by_name["lib/modules/6.13.0/kernel/drivers/dummy.ko"].data == b"\x7fELF module"
    assert by_name["lib/modules/6.13.0/build"].data == b"/usr/src/linux"
    # `make modules_install` again: the manifest changes, so does the key
    dep = tmp_path / "inst/lib/modules/6.13.0/modules.dep"
    os.utime(dep, ns=(1, 1))
    assert kernels.ensure_kernel(layout, spec, {}).key != k.key


def make_deb(tmp_path: Path, modules_dir: str | None) -> Path:
    """A minimal linux-image .deb built with dpkg-deb (on every Debian host)."""
    root = tmp_path / "debroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: linux-image-6.13.0-test\nVersion: 6.13.0-1\nArchitecture: arm64\n"
        "Maintainer: test <t@example.org>\nDescription: test kernel\n")
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-6.13.0-test").write_bytes(gzip.compress(image_bytes(b"deb kernel")))
    if modules_dir:  # "lib/modules" (older kbuild, bookworm) or "usr/lib/modules" (trixie)
        write_modules(root / "usr" if modules_dir.startswith("usr/") else root, "6.13.0-test")
    deb = tmp_path / "linux-image-6.13.0-test_6.13.0-1_arm64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


@pytest.mark.parametrize("layout_dir", ["lib/modules", "usr/lib/modules"])
def test_user_deb_gives_its_vmlinuz_and_modules(tmp_path, layout_dir):
    deb = make_deb(tmp_path, layout_dir)
    layout = Layout(tmp_path / "cache")
    k = kernels.ensure_kernel(layout, KernelSpec("deb", str(deb)), {})
    assert gzip.decompress(k.vmlinuz.read_bytes()).endswith(b"deb kernel")
    [entries] = read_archives(k.modules_cpio.read_bytes())
    names = [e.name for e in entries]
    assert "lib/modules/6.13.0-test/kernel/drivers/dummy.ko" in names
    assert "lib/modules/6.13.0-test/modules.dep" in names
    assert k.key.startswith("deb-") and k.description.startswith(f"user .deb {deb} sha256:")
    assert k.description.endswith(", its modules 6.13.0-test")
    again = kernels.ensure_kernel(layout, KernelSpec("deb", str(deb)), {})
    assert again == k


def test_user_deb_without_modules(tmp_path):
    deb = make_deb(tmp_path, None)
    k = kernels.ensure_kernel(Layout(tmp_path / "cache"), KernelSpec("deb", str(deb)), {})
    assert k.modules_cpio is None and k.vmlinuz.is_file()


def test_the_store_keeps_the_newest_kernels(tmp_path):
    layout = Layout(tmp_path)
    store = kernels.KernelStore(layout)

    def make(work):
        (work / "vmlinuz").write_bytes(b"k")

    for i in range(kernels.KERNELS_KEEP):
        store.put(f"k{i}", f"kernel {i}", make)
        os.utime(layout.kernels / f"k{i}" / "stamp.json", (1000 + i, 1000 + i))
    assert store.lookup("k0", "kernel 0") is not None        # k0 used again just now
    for i in range(kernels.KERNELS_KEEP, kernels.KERNELS_KEEP + 2):
        store.put(f"k{i}", f"kernel {i}", make)
        os.utime(layout.kernels / f"k{i}" / "stamp.json", (1000 + i, 1000 + i))
    left = sorted(d.name for d in layout.kernels.iterdir())
    # the least recently used go, the one just used stays however old it was made
    assert left == ["k0", "k3", "k4", "k5"]
    # a stamp from another description (or format) is not a match
    assert store.lookup("k5", "another kernel") is None
    stamp = json.loads((layout.kernels / "k5" / "stamp.json").read_text())
    assert stamp["key"] == "k5" and stamp["modules"] is None


def debian_download_env(tmp_path, monkeypatch, depends=""):
    """ensure_kernel for a Debian suite with apt and dpkg-deb replaced: returns the list of
    downloaded Debs and the archives directory."""
    downloads = []
    archives = tmp_path / "archives"

    class Apt(FakeSuiteApt):
        def __init__(self, *a):
            super().__init__(*a)
            self.archives = archives

        def download(self, debs):
            downloads.extend(debs)
            archives.mkdir(exist_ok=True)
            for d in debs:
                (archives / d.filename).write_bytes(b"deb")

    def fake_extract(deb, dest):
        if "linux-binary" in depends and "linux-binary" not in deb.name:
            raise AssertionError(f"the Image is in linux-binary, not in {deb.name}")
        dest.write_bytes(image_bytes(deb.name.encode()))
        return "vmlinuz-6.12.118+deb13-arm64"

    monkeypatch.setattr(kernels, "suite_apt",
                        lambda layout, suite: Apt(layout.suites / suite, MADISON_TRIXIE, SHOW_TRIXIE))
    monkeypatch.setattr(kernels, "extract_kernel", fake_extract)
    monkeypatch.setattr(kernels, "deb_field", lambda deb, field: depends)
    return downloads, archives


STAMP = {"kernel": "linux-image-6.1.0-57-arm64=6.1.192-3:arm64"}


def test_a_debian_kernel_is_downloaded_once_and_its_deb_dropped(tmp_path, monkeypatch):
    layout = Layout(tmp_path)
    downloads, archives = debian_download_env(tmp_path, monkeypatch, depends="kmod, linux-base")
    k = kernels.ensure_kernel(layout, KernelSpec("suite", "trixie"), STAMP)
    assert k.key == "linux-image-6.12.118+deb13-arm64_6.12.118-1"
    assert k.description == "linux-image-6.12.118+deb13-arm64=6.12.118-1 (trixie, from trixie-security)"
    assert downloads == [Deb("linux-image-6.12.118+deb13-arm64", "6.12.118-1", "arm64")]
    assert not list(archives.iterdir())
    assert kernels.ensure_kernel(layout, KernelSpec("suite", "trixie"), STAMP) == k
    assert len(downloads) == 1
    assert not (layout.root / "image").exists()   # the base image is not touched


def test_an_empty_image_package_leads_to_its_linux_binary(tmp_path, monkeypatch):
    depends = ("dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
               "linux-base-7.2.13+deb14-arm64 (= 7.2.13-1), linux-binary-7.2.13+deb14-arm64 (= 7.2.13-1), "
               "linux-modules-7.2.13+deb14-arm64 (= 7.2.13-1)")
    downloads, archives = debian_download_env(tmp_path, monkeypatch, depends)
    k = kernels.ensure_kernel(Layout(tmp_path), KernelSpec("suite", "trixie"), STAMP)
    assert [d.name for d in downloads] == ["linux-image-6.12.118+deb13-arm64", "linux-binary-7.2.13+deb14-arm64"]
    assert k.vmlinuz.read_bytes().endswith(b"linux-binary-7.2.13+deb14-arm64_7.2.13-1_arm64.deb")
    assert not list(archives.iterdir())


def test_a_version_naming_the_default_kernel_uses_the_image(tmp_path, monkeypatch):
    layout = Layout(tmp_path)
    answers = {"bookworm": (MADISON_BOOKWORM, SHOW_BOOKWORM), "trixie": (MADISON_TRIXIE, SHOW_TRIXIE),
               "bookworm-backports": (MADISON_BPO, SHOW_BPO), "trixie-backports": ("", ""),
               "sid": (MADISON_SID, SHOW_SID)}

    def table(apt, suite, refresh, now=None):
        return kernels.candidates(suite, *answers[suite])

    monkeypatch.setattr(kernels, "suite_table", table)
    stamp = {"kernel": "linux-image-6.1.0-57-arm64=6.1.192-3:arm64"}
    k = kernels.ensure_kernel(layout, KernelSpec("version", "6.1"), stamp)
    assert k.key == "default" and k.vmlinuz == layout.kernel


def test_run_script_carries_the_kernel_description():
    from testbed_lib import job

    script = job.run_script(["true"], {"KVMITS_TESTBED_KERNEL": "linux-image-6.12.118+deb13-arm64=6.12.118-1 (trixie)"})
    assert "export KVMITS_TESTBED_KERNEL='linux-image-6.12.118+deb13-arm64=6.12.118-1 (trixie)'" in script
