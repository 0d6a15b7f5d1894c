"""tools/linux-guest and the testbed's nested Linux guest (testbed_lib/linux_guest.py): module
closures from fake modules trees, .modinfo, decompression, the init script, the initramfs, the
cache beside each kernel and the archive a run gets. No network: .debs are made with dpkg-deb."""

import contextlib
import gzip
import io
import json
import lzma
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from testbed_lib import kernels, linux_guest, linux_guest_cli
from testbed_lib.errors import TestbedError
from testbed_lib.kernels import KernelSpec
from testbed_lib.linux_guest import GuestBuildError, ModuleTree
from testbed_lib.paths import Layout

from .newc_reader import read_archives

RELEASE = "6.1.0-57-arm64"
BUSYBOX = b"\x7fELF busybox for arm64"


def fake_ko(name: str, depends: str = "", vermagic: str | None = f"{RELEASE} SMP mod_unload aarch64",
            elfclass: int = 2, order: str = "<") -> bytes:
    """An ELF relocatable with a .modinfo section, as modpost writes one (and nothing else)."""
    fields = [f"name={name}", f"depends={depends}"] + ([f"vermagic={vermagic}"] if vermagic else [])
    modinfo = b"\0".join(f.encode() for f in fields) + b"\0"
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body_at = 64 if elfclass == 2 else 52
    modinfo_at, shstrtab_at = body_at, body_at + len(modinfo)
    shoff = (shstrtab_at + len(shstrtab) + 7) & ~7
    sections = [(0, 0, 0, 0), (1, 1, modinfo_at, len(modinfo)), (10, 3, shstrtab_at, len(shstrtab))]
    ident = b"\x7fELF" + bytes([elfclass, 1 if order == "<" else 2, 1]) + bytes(9)
    if elfclass == 2:
        header = struct.pack(order + "16sHHIQQQIHHHHHH", ident, 1, 183, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
        shdr = [struct.pack(order + "IIQQQQIIQQ", n, t, 0, 0, off, size, 0, 0, 1, 0) for n, t, off, size in sections]
    else:
        header = struct.pack(order + "16sHHIIIIIHHHHHH", ident, 1, 40, 1, 0, 0, shoff, 0, 52, 0, 0, 40, 3, 2)
        shdr = [struct.pack(order + "IIIIIIIIII", n, t, 0, 0, off, size, 0, 0, 1, 0) for n, t, off, size in sections]
    blob = header + modinfo + shstrtab
    return blob + bytes(shoff - len(blob)) + b"".join(shdr)


def write_tree(root: Path, modules: dict[str, tuple[str, str]], builtin=(), release=RELEASE) -> Path:
    """lib/modules/<release> with modules {file path under kernel/: (name, depends)}; a file
    ending .xz or .gz is compressed so."""
    tree = root / "lib" / "modules" / release
    (tree / "kernel").mkdir(parents=True)
    for rel, (name, depends) in modules.items():
        path = tree / "kernel" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = fake_ko(name, depends, f"{release} SMP mod_unload aarch64")
        if rel.endswith(".xz"):
            data = lzma.compress(data, format=lzma.FORMAT_XZ)
        elif rel.endswith(".gz"):
            data = gzip.compress(data)
        path.write_bytes(data)
    (tree / "modules.builtin").write_text("".join(f"kernel/{b}\n" for b in builtin))
    (tree / "build").symlink_to("/usr/src/nowhere")
    return tree


# the shape of bookworm's 6.1: virtio and virtio_ring built in, the PCI transport modular
BOOKWORM = {
    "drivers/virtio/virtio_pci.ko": ("virtio_pci", "virtio_pci_modern_dev,virtio_pci_legacy_dev"),
    "drivers/virtio/virtio_pci_modern_dev.ko": ("virtio_pci_modern_dev", ""),
    "drivers/virtio/virtio_pci_legacy_dev.ko": ("virtio_pci_legacy_dev", ""),
    "drivers/block/virtio_blk.ko": ("virtio_blk", ""),
    "drivers/char/hw_random/virtio-rng.ko": ("virtio_rng", ""),
    "drivers/net/virtio_net.ko": ("virtio_net", "net_failover"),
}
BOOKWORM_BUILTIN = ("drivers/virtio/virtio.ko", "drivers/virtio/virtio_ring.ko", "drivers/char/hw_random/rng-core.ko")


def image_bytes(tag: bytes = b"") -> bytes:
    head = bytearray(64)
    head[0x38:0x3C] = b"ARMd"
    return bytes(head) + tag


def test_module_names_are_the_kernels():
    assert linux_guest.module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert linux_guest.module_name("rng-core.ko") == "rng_core"
    assert linux_guest.module_name("virtio_blk.ko.zst") == "virtio_blk"
    assert linux_guest.module_name("a.ko.gz") == "a"


def test_modinfo_of_both_elf_classes_and_byte_orders():
    for elfclass in (1, 2):
        for order in "<>":
            info = linux_guest.modinfo(fake_ko("m", "a,b", elfclass=elfclass, order=order))
            assert info["depends"] == ["a,b"] and info["name"] == ["m"]
    with pytest.raises(GuestBuildError, match="x.ko: not an ELF file"):
        linux_guest.modinfo(b"MZ", "x.ko")
    elf = fake_ko("m").replace(b".modinfo", b".notinfo")
    with pytest.raises(GuestBuildError, match="no .modinfo section"):
        linux_guest.modinfo(elf, "m.ko")


def test_the_closure_puts_dependencies_first_and_skips_the_builtin(tmp_path):
    tree = ModuleTree.scan(write_tree(tmp_path, BOOKWORM, BOOKWORM_BUILTIN))
    assert tree.release == RELEASE and "virtio_net" in tree.files and "virtio_ring" in tree.builtin
    assert [m.name for m in tree.closure()] == [
        "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk", "virtio_rng"]
    assert tree.closure()[2].depends == ("virtio_pci_modern_dev", "virtio_pci_legacy_dev")
    # trixie's 6.12 shape: the whole PCI transport built in
    trixie = ModuleTree.scan(write_tree(tmp_path / "t", {
        "drivers/block/virtio_blk.ko.xz": ("virtio_blk", ""),
        "drivers/char/hw_random/virtio-rng.ko.xz": ("virtio_rng", "rng-core"),
        "drivers/char/hw_random/rng-core.ko.xz": ("rng_core", "")},
        builtin=("drivers/virtio/virtio_pci.ko", "drivers/virtio/virtio.ko")))
    assert [m.name for m in trixie.closure()] == ["virtio_blk", "rng_core", "virtio_rng"]
    assert trixie.closure()[-1].elf.startswith(b"\x7fELF")   # decompressed


def test_a_shared_dependency_is_loaded_once_before_both(tmp_path):
    tree = ModuleTree.scan(write_tree(tmp_path, {
        "a.ko": ("a", "c"), "b.ko.gz": ("b", "c,d"), "c.ko": ("c", "e"), "d.ko.xz": ("d", ""), "e.ko": ("e", "")}))
    assert [m.name for m in tree.closure(("a", "b"))] == ["e", "c", "a", "d", "b"]


def test_what_cannot_be_loaded_is_named(tmp_path):
    tree = ModuleTree.scan(write_tree(tmp_path, {"a.ko": ("a", "b"), "b.ko": ("b", "gone")}))
    with pytest.raises(GuestBuildError, match=r"module gone \(needed by b <- a\): neither in .* nor in its "
                                              r"modules.builtin"):
        tree.closure(("a",))
    with pytest.raises(GuestBuildError, match="module virtio_blk: neither"):
        tree.closure(("virtio_blk",))
    cyclic = ModuleTree.scan(write_tree(tmp_path / "c", {"a.ko": ("a", "b"), "b.ko": ("b", "a")}))
    with pytest.raises(GuestBuildError, match="cycle: a -> b -> a"):
        cyclic.closure(("a",))
    other = write_tree(tmp_path / "o", {"a.ko": ("a", "")})
    (other / "kernel" / "a.ko").write_bytes(fake_ko("a", vermagic="6.12.118+deb13-arm64 SMP"))
    with pytest.raises(GuestBuildError, match=f"a.ko is built for kernel 6.12.118\\+deb13-arm64, not {RELEASE}"):
        ModuleTree.scan(other).closure(("a",))
    twice = write_tree(tmp_path / "w", {"x/a.ko": ("a", ""), "y/a.ko.xz": ("a", "")})
    with pytest.raises(GuestBuildError, match="module a twice"):
        ModuleTree.scan(twice)


def test_zstd_modules_need_the_zstd_program(tmp_path, monkeypatch):
    path = tmp_path / "m.ko.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setattr(linux_guest.shutil, "which", lambda name: None)
    with pytest.raises(GuestBuildError, match=r"m.ko.zst is zstd-compressed, and this host has no zstd "
                                              r"program to decompress it \(apt-get install zstd\)"):
        linux_guest.read_module(path)


def test_bootable_image_decompresses_what_the_loader_should_not_have_to(tmp_path):
    image = image_bytes(b"kernel text" * 100)
    assert linux_guest.bootable_image(image) == (image, "Image")
    assert linux_guest.bootable_image(gzip.compress(image)) == (image, "gzip'ed Image, decompressed")
    for method, packed in (("gzip", gzip.compress(image) + b"\0\0\0\0"), ("xz", lzma.compress(image))):
        zboot = bytearray(0x100)
        zboot[0:2], zboot[4:8] = b"MZ", b"zimg"
        struct.pack_into("<II", zboot, 8, len(zboot), len(packed))
        zboot[24:24 + len(method)] = method.encode()
        got, kind = linux_guest.bootable_image(bytes(zboot) + packed)
        assert got == image and kind == f"EFI zboot image ({method}), payload decompressed"
    zboot[24:32] = b"lz4\0\0\0\0\0"
    with pytest.raises(GuestBuildError, match="compressed with 'lz4'"):
        linux_guest.bootable_image(bytes(zboot) + packed)
    with pytest.raises(GuestBuildError, match="not an arm64 Image"):
        linux_guest.bootable_image(b"\x7fELF" + bytes(100))
    with pytest.raises(GuestBuildError, match="does not hold an arm64 Image"):
        linux_guest.bootable_image(gzip.compress(b"vmlinux"))


def test_the_init_script_follows_the_contract(tmp_path):
    script = linux_guest.init_script(["virtio_pci_modern_dev", "virtio_pci", "virtio_blk"])
    assert script.startswith("#!/bin/busybox sh\n")
    for line in ("mount -t proc proc /proc", "mount -t sysfs sysfs /sys", "mount -t devtmpfs devtmpfs /dev",
                 "for m in virtio_pci_modern_dev virtio_pci virtio_blk; do",
                 '    out=$(insmod /lib/modules/$m.ko 2>&1) || echo "KVMITS-GUEST-INSMOD-FAILED $m: $out"',
                 "echo KVMITS-GUEST-READY", "if [ -f /job.sh ]; then", "    sh /job.sh </dev/null",
                 "    rc=127", 'echo "KVMITS-GUEST-DONE rc=$rc"', "sync", "poweroff -f"):
        assert line in script.splitlines(), line
    lines = script.splitlines()
    assert lines.index("echo KVMITS-GUEST-READY") > lines.index("done") > lines.index("mount -t devtmpfs devtmpfs /dev")
    assert lines[-1] == "poweroff -f"
    # and the host's sh reads it (the guest's is busybox's ash, a POSIX shell too)
    (tmp_path / "init").write_text(script)
    assert subprocess.run(["sh", "-n", str(tmp_path / "init")]).returncode == 0


def test_init_closes_the_console_after_done_and_before_poweroff(tmp_path):
    # The last close of the console's tty waits until the UART has sent what is queued; without
    # it 6.12 lost the DONE line to the power-off (docs/kernels.md). Run /init's end with
    # stand-ins for sync and poweroff that record where their stdio points.
    script = linux_guest.init_script([])
    tail = script[script.index('echo "KVMITS-GUEST-DONE'):]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sync", "poweroff"):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\nfds=$(for fd in 0 1 2; do readlink /proc/$$/fd/$fd; done)\n"
                        f"echo $fds > {tmp_path / name}.fds\n")
        tool.chmod(0o755)
    out = subprocess.run(["sh", "-c", "rc=3\n" + tail], capture_output=True, text=True, check=True,
                         env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert out.stdout == "KVMITS-GUEST-DONE rc=3\n"
    assert (tmp_path / "poweroff.fds").read_text().split() == ["/dev/null"] * 3


def test_the_initramfs(tmp_path):
    tree = ModuleTree.scan(write_tree(tmp_path, BOOKWORM, BOOKWORM_BUILTIN))
    guest = linux_guest.make_guest(image_bytes(), tree, BUSYBOX)
    assert guest.modules == ("virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk", "virtio_rng")
    [entries] = read_archives(guest.initramfs)
    by = {e.name: e for e in entries}
    assert by["bin/busybox"].data == BUSYBOX and stat.S_IMODE(by["bin/busybox"].mode) == 0o755
    assert stat.S_ISCHR(by["dev/console"].mode) and by["dev/console"].rdev == (5, 1)
    assert stat.S_IMODE(by["tmp"].mode) == 0o1777
    assert by["init"].data.decode() == linux_guest.init_script(guest.modules)
    assert by["lib/modules/virtio_rng.ko"].data == fake_ko("virtio_rng", "", f"{RELEASE} SMP mod_unload aarch64")
    assert all(e.mtime == 0 and e.uid == 0 for e in entries)
    assert linux_guest.make_guest(image_bytes(), tree, BUSYBOX).initramfs == guest.initramfs  # reproducible
    assert guest.describe().startswith(f"{RELEASE}: Image 0.0 MiB, initramfs ")


def test_the_guest_directory_links_an_unchanged_image(tmp_path):
    tree = ModuleTree.scan(write_tree(tmp_path, BOOKWORM, BOOKWORM_BUILTIN))
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(image_bytes())
    linux_guest.write_guest_dir(linux_guest.make_guest(vmlinuz.read_bytes(), tree, BUSYBOX), tmp_path / "g", vmlinuz)
    assert (tmp_path / "g" / "Image").stat().st_ino == vmlinuz.stat().st_ino
    assert (tmp_path / "g" / "release").read_text() == RELEASE + "\n"
    vmlinuz.write_bytes(gzip.compress(image_bytes()))
    linux_guest.write_guest_dir(linux_guest.make_guest(vmlinuz.read_bytes(), tree, BUSYBOX), tmp_path / "h", vmlinuz)
    assert (tmp_path / "h" / "Image").read_bytes() == image_bytes()


def build_deb(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    root = tmp_path / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1\nArchitecture: arm64\nMaintainer: t <t@example.org>\nDescription: t\n")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    deb = tmp_path / f"{name}_1_arm64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def kernel_deb_files(release=RELEASE, prefix="usr/lib/modules") -> dict[str, bytes]:
    files = {f"boot/vmlinuz-{release}": image_bytes(b"deb kernel"),
             f"{prefix}/{release}/modules.builtin": b"kernel/drivers/virtio/virtio.ko\n"}
    for rel, (name, depends) in BOOKWORM.items():
        files[f"{prefix}/{release}/kernel/{rel}.xz"] = lzma.compress(fake_ko(name, depends))
    return files


def test_the_modules_of_a_kernel_deb(tmp_path):
    deb = build_deb(tmp_path, "linux-image-test", kernel_deb_files())
    with linux_guest.deb_modules([deb], tmp_path / "work") as tree:
        assert tree.release == RELEASE and tree.files["virtio_rng"].name == "virtio-rng.ko.xz"
        assert [m.name for m in tree.closure()][-1] == "virtio_rng"
    assert list((tmp_path / "work").iterdir()) == []   # the unpacked tree is gone
    empty = build_deb(tmp_path, "linux-image-empty", {"boot/vmlinuz-1": image_bytes()})
    with pytest.raises(GuestBuildError, match="expected the modules of one kernel release .* found none"):
        with linux_guest.deb_modules([empty], tmp_path / "work"):
            pass


def busybox_layout(tmp_path: Path) -> tuple[Layout, dict]:
    """A cache whose apt archives hold a busybox-static .deb, and an image stamp naming it."""
    layout = Layout(tmp_path / "cache")
    layout.archives.mkdir(parents=True)
    deb = build_deb(tmp_path, "busybox-static", {"bin/busybox": BUSYBOX})
    entry = "busybox-static=1:1.35.0-4:arm64"
    deb.rename(layout.archives / kernels.stamp_deb(entry).filename)
    return layout, {"kernel": "linux-image-6.1.0-57-arm64=6.1.192-3:arm64", "guest_packages": [entry, "python3=3.11:arm64"]}


def test_a_user_image_with_modules_gets_a_guest_beside_it_once(tmp_path, monkeypatch):
    layout, stamp = busybox_layout(tmp_path)
    image = tmp_path / "Image"
    image.write_bytes(image_bytes(b"mine"))
    write_tree(tmp_path / "inst", BOOKWORM, BOOKWORM_BUILTIN)
    spec = KernelSpec("image", str(image), str(tmp_path / "inst"))
    k = kernels.ensure_kernel(layout, spec, stamp)
    guest = k.guest
    assert guest.directory == k.vmlinuz.parent / "linux-guest"
    assert (guest.directory / "Image").read_bytes() == image.read_bytes()
    assert (guest.directory / "release").read_text() == RELEASE + "\n"
    [entries] = read_archives((guest.directory / "initramfs.cpio").read_bytes())
    assert {e.name: e.data for e in entries}["bin/busybox"] == BUSYBOX
    assert guest.note.startswith(RELEASE) and "virtio_rng" in guest.note
    saved = json.loads((guest.directory / "stamp.json").read_text())
    assert saved["recipe"]["busybox"] == "busybox-static=1:1.35.0-4:arm64" and saved["modules"][-1] == "virtio_rng"

    def no_rebuild(*args):
        raise AssertionError("rebuilt a current guest")

    monkeypatch.setattr(linux_guest, "make_guest", no_rebuild)
    assert kernels.ensure_kernel(layout, spec, stamp).guest == guest
    # another init script (or module list, or busybox): made again
    monkeypatch.setattr(linux_guest, "ROOT_MODULES", ("virtio_blk",))
    with pytest.raises(AssertionError, match="rebuilt"):
        kernels.ensure_kernel(layout, spec, stamp)


def test_a_user_image_without_modules_has_no_guest_and_says_why(tmp_path, capsys):
    layout, stamp = busybox_layout(tmp_path)
    image = tmp_path / "Image"
    image.write_bytes(image_bytes())
    k = kernels.ensure_kernel(layout, KernelSpec("image", str(image)), stamp)
    assert k.guest.directory is None and "a user Image without --modules DIR" in k.guest.note
    buf = io.BytesIO()
    linux_guest.write_testbed_archive(buf, k.guest)
    [entries] = read_archives(buf.getvalue())
    assert [e.name for e in entries] == ["opt", "opt/kvmits", "opt/kvmits/linux-guest.missing"]
    assert entries[-1].data.decode() == k.guest.note + "\n"
    # remembered: the same answer without trying again
    assert kernels.ensure_kernel(layout, KernelSpec("image", str(image)), stamp).guest == k.guest


def test_a_user_deb_brings_its_own_modules(tmp_path):
    layout, stamp = busybox_layout(tmp_path)
    deb = build_deb(tmp_path, "linux-image-test", kernel_deb_files(prefix="lib/modules"))
    k = kernels.ensure_kernel(layout, KernelSpec("deb", str(deb)), stamp)
    assert k.guest.directory is not None and k.guest.note.startswith(RELEASE)


def test_a_failure_of_the_testbed_is_told_not_remembered(tmp_path, monkeypatch, capsys):
    layout, stamp = busybox_layout(tmp_path)
    calls = []

    @contextlib.contextmanager
    def offline():
        calls.append(1)
        raise TestbedError("arm64 apt: 'apt-get download ...' failed with status 100")
        yield

    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(image_bytes())
    busybox = layout.archives / kernels.stamp_deb(stamp["guest_packages"][0]).filename
    for _ in range(2):
        got = linux_guest.ensure(tmp_path / "g", vmlinuz, "k", busybox, "busybox-static=1", offline)
        assert got.directory is None and "could not make it" in got.note
    assert len(calls) == 2 and "warning: no nested Linux guest this time" in capsys.readouterr().err


def test_the_run_gets_the_guest_at_opt_kvmits(tmp_path):
    guest = tmp_path / "g"
    guest.mkdir()
    for name, data in (("Image", image_bytes()), ("initramfs.cpio", b"cpio"), ("release", b"r\n")):
        (guest / name).write_bytes(data)
    buf = io.BytesIO()
    linux_guest.write_testbed_archive(buf, linux_guest.Cached(guest, "r"))
    [entries] = read_archives(buf.getvalue())
    assert [e.name for e in entries] == ["opt", "opt/kvmits", "opt/kvmits/linux-guest",
                                         "opt/kvmits/linux-guest/Image", "opt/kvmits/linux-guest/initramfs.cpio",
                                         "opt/kvmits/linux-guest/release"]
    assert entries[3].data == image_bytes() and entries[5].data == b"r\n"


def test_the_command_line(tmp_path, capsys):
    layout, stamp = busybox_layout(tmp_path)
    busybox = next(layout.archives.glob("*.deb"))
    image = tmp_path / "Image"
    image.write_bytes(gzip.compress(image_bytes(b"gz")))
    write_tree(tmp_path / "inst", BOOKWORM, BOOKWORM_BUILTIN)
    out = tmp_path / "out"
    assert linux_guest_cli.main(["--image", str(image), "--modules", str(tmp_path / "inst"),
                                 "--busybox", str(busybox), "-o", str(out)]) == 0
    assert (out / "Image").read_bytes() == image_bytes(b"gz") and (out / "release").read_text() == RELEASE + "\n"
    assert "linux-guest: nested Linux guest 6.1.0-57-arm64" in capsys.readouterr().err
    deb = build_deb(tmp_path, "linux-image-test", kernel_deb_files())
    assert linux_guest_cli.main(["--deb", str(deb), "--busybox", str(busybox), "-o", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "Image").read_bytes() == image_bytes(b"deb kernel")
    empty = build_deb(tmp_path, "linux-image-empty", {"boot/vmlinuz-1": image_bytes()})
    assert linux_guest_cli.main(["--deb", str(empty), "--busybox", str(busybox), "-o", str(tmp_path / "e")]) == 1
    assert "error: no guest: " in capsys.readouterr().err
    for argv in (["--image", str(image), "-o", "x"], ["--deb", str(deb), "--kernel", "trixie", "-o", "x"],
                 ["--deb", str(deb), "--image", str(image), "--modules", "m", "-o", "x"], ["--kernel", "trixie"]):
        with pytest.raises(SystemExit) as exc:
            linux_guest_cli.main(argv)
        assert exc.value.code == 2


def test_the_launcher_is_executable():
    launcher = Path(__file__).resolve().parents[2] / "tools" / "linux-guest"
    assert os.access(launcher, os.X_OK)
    proc = subprocess.run([str(launcher), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "/opt/kvmits/linux-guest" in proc.stdout


def test_a_split_kernel_gives_the_guest_all_its_parts(tmp_path, monkeypatch):
    """Debian's 7.x: linux-image-<abi> is empty; the Image is in linux-binary, the modules in
    linux-modules, modules.builtin in linux-base. The Image needs one part, the guest all."""
    abi = "7.2.13+deb14-arm64"
    depends = (f"dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-{abi} (= 7.2.13-1), "
               f"linux-binary-{abi} (= 7.2.13-1), linux-modules-{abi} (= 7.2.13-1)")
    downloads = []

    class Apt:
        archives = tmp_path

        def download(self, debs):
            downloads.extend(d.name for d in debs)
            for d in debs:
                (tmp_path / d.filename).write_bytes(b"deb")

    monkeypatch.setattr(kernels, "deb_field", lambda deb, field: depends)
    chosen = kernels.Candidate("sid", "sid", "7.2.13-1", f"linux-image-{abi}")
    with kernels._SuiteDebs(Apt(), chosen, keep=False) as debs:
        assert debs.image().name == f"linux-binary-{abi}_7.2.13-1_arm64.deb"
        assert [p.name.split("_")[0] for p in debs.everything()] == [
            f"linux-image-{abi}", f"linux-base-{abi}", f"linux-binary-{abi}", f"linux-modules-{abi}"]
        debs.everything()   # asked again: nothing downloaded again
    assert downloads == [f"linux-image-{abi}", f"linux-binary-{abi}", f"linux-base-{abi}", f"linux-modules-{abi}"]
    assert not list(tmp_path.glob("*.deb"))    # a suite's .debs go once used


def test_busybox_comes_out_of_its_deb(tmp_path):
    deb = build_deb(tmp_path, "busybox-static", {"bin/busybox": BUSYBOX, "usr/share/doc/x": b"doc"})
    assert linux_guest.read_busybox(deb) == BUSYBOX
    with pytest.raises(GuestBuildError, match="no ./bin/busybox in"):
        linux_guest.read_busybox(build_deb(tmp_path, "other", {"bin/sh": b"sh"}))
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"not a deb")
    with pytest.raises(TestbedError, match="dpkg-deb --fsys-tarfile .*bad.deb failed"):
        linux_guest.read_busybox(bad)
