"""include/kvmits.h against the real kernel headers, for x86_64 and for arm64.

For each architecture we generate a C file that includes <linux/kvm.h> and stores, in a
section of its own, every struct size, member offset, member size, constant and ioctl number
that kvmits computes from its cffi declarations; we compile it with that architecture's
compiler (no need to run it: the values are read back from the object file with objcopy) and
compare. Headers: Debian's linux-libc-dev (host) and linux-libc-dev-arm64-cross (arm64, with
gcc-aarch64-linux-gnu). The test installs nothing; .ci/run installs them. Without the tools
it skips saying why, except under CI=true where a skip would hide a broken layout: it fails.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import struct
import subprocess

import cffi
import pytest

from kvmits import uapi
from kvmits.uapi.ioctls import IOCTLS, ioctl_numbers

SECTION = "kvmits_layout"

# (architecture, C compiler, objcopy, which header sections and ioctls apply)
TARGETS = {
    "x86_64": ({"x86_64": "cc", "aarch64": "x86_64-linux-gnu-gcc"}, {"x86_64": "objcopy", "aarch64": "x86_64-linux-gnu-objcopy"},
               ("generic", "x86"), "linux-libc-dev (native) or gcc-x86-64-linux-gnu (cross)"),
    "aarch64": ({"aarch64": "cc", "x86_64": "aarch64-linux-gnu-gcc"}, {"aarch64": "objcopy", "x86_64": "aarch64-linux-gnu-objcopy"},
                ("generic", "arm64"), "gcc-aarch64-linux-gnu and linux-libc-dev-arm64-cross"),
}

ARM64_CORE_C = {f"x{n}": f"regs.regs[{n}]" for n in range(31)}
ARM64_CORE_C.update(sp="regs.sp", pc="regs.pc", pstate="regs.pstate", sp_el1="sp_el1", elr_el1="elr_el1")


def struct_names(text: str) -> list[str]:
    return re.findall(r"^struct (\w+) \{", text, flags=re.M)


def define_names(text: str) -> list[str]:
    return re.findall(r"^#define (\w+) ", text, flags=re.M)


def walk_fields(ffi, ctype, prefix=""):
    """(path, offset, size) of every named member, recursing into named structs/unions."""
    for name, field in ctype.fields:
        path = f"{prefix}{name}"
        flexible = field.type.kind == "array" and field.type.length is None
        yield path, field.offset, None if flexible else ffi.sizeof(field.type)
        if field.type.kind in ("struct", "union") and field.type.fields:
            for sub, off, size in walk_fields(ffi, field.type, path + "."):
                yield sub, field.offset + off, size


def expectations(ffi, header_text: str, sections) -> list[tuple[str, str, int]]:
    """(label, C expression, value kvmits uses) for everything the header declares."""
    parts = uapi.header_sections(header_text)
    out = []
    for sec in sections:
        text = parts[sec]
        for name in struct_names(text):
            ctype = ffi.typeof(f"struct {name}")
            out.append((f"sizeof(struct {name})", f"sizeof(struct {name})", ffi.sizeof(ctype)))
            for path, off, size in walk_fields(ffi, ctype):
                out.append((f"offsetof(struct {name}, {path})", f"offsetof(struct {name}, {path})", off))
                if size is not None:     # a flexible array member has no size of its own
                    out.append((f"sizeof(struct {name}.{path})", f"sizeof(((struct {name} *)0)->{path})", size))
        lib = ffi.dlopen(None)
        for name in define_names(text):
            out.append((name, f"(unsigned long long)({name})", getattr(lib, name) & 0xFFFFFFFFFFFFFFFF))
    numbers = ioctl_numbers(ffi)
    for name, (_d, _n, _t, arch) in IOCTLS.items():
        if arch in sections:
            out.append((name, f"(unsigned long long)({name})", numbers[name]))
    if "arm64" in sections:
        for reg, cpath in ARM64_CORE_C.items():
            expr = f"(KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG({cpath}))"
            out.append((f"arm64_core_reg({reg!r})", expr, uapi.arm64_core_reg(reg)))
    return out


def c_source(exps) -> str:
    lines = ["#include <stddef.h>", "#include <linux/kvm.h>",
             f'__attribute__((section("{SECTION}"), used)) const unsigned long long kvmits_values[] = {{']
    lines += [f"    (unsigned long long)({expr}),   /* {label} */" for label, expr, _ in exps]
    lines.append("};")
    return "\n".join(lines) + "\n"


def compile_values(cc: str, objcopy: str, source: str, tmp_path) -> list[int]:
    src = tmp_path / "layout.c"
    obj = tmp_path / "layout.o"
    raw = tmp_path / "layout.bin"
    src.write_text(source)
    subprocess.run([cc, "-c", "-O0", "-o", str(obj), str(src)], check=True, capture_output=True, text=True)
    subprocess.run([objcopy, "-O", "binary", f"--only-section={SECTION}", str(obj), str(raw)], check=True)
    data = raw.read_bytes()
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def mismatches(exps, values) -> list[str]:
    assert len(values) == len(exps), "the compiled table does not match the expectations"
    return [f"{label}: kvmits {mine:#x}, kernel {real:#x}" for (label, _e, mine), real in zip(exps, values) if mine != real]


def toolchain(arch: str):
    ccs, objcopies, sections, packages = TARGETS[arch]
    host = platform.machine()
    cc, objcopy = ccs.get(host), objcopies.get(host)
    missing = [t for t in (cc, objcopy) if not t or not shutil.which(t)]
    if missing:
        reason = f"no {arch} toolchain ({', '.join(m or '?' for m in missing)}): install {packages}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: a skipped layout check would hide a broken layout)")
        pytest.skip(reason)
    return cc, objcopy, sections


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_layout_matches_kernel_headers(arch, tmp_path):
    cc, objcopy, sections = toolchain(arch)
    exps = expectations(uapi.ffi, uapi.HEADER.read_text(), sections)
    assert len(exps) > 150                       # structs, members, constants, ioctls all present
    try:
        values = compile_values(cc, objcopy, c_source(exps), tmp_path)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"{arch}: compiling against the kernel headers failed (a name kvmits uses does not exist "
                    f"there?):\n{exc.stderr}")
    bad = mismatches(exps, values)
    assert not bad, f"{arch}: include/kvmits.h disagrees with the kernel headers:\n" + "\n".join(bad)


def test_a_wrong_offset_is_caught(tmp_path):
    """The check itself can fail: move one kvm_run member and the host comparison must see it."""
    cc, objcopy, sections = toolchain(platform.machine() if platform.machine() in TARGETS else "x86_64")
    text = uapi.HEADER.read_text()
    broken = text.replace("uint64_t phys_addr;\n            uint8_t data[8];",
                          "uint64_t phys_addr;\n            uint8_t data[4];")
    assert broken != text
    ffi = cffi.FFI()
    ffi.cdef(broken)
    exps = expectations(ffi, broken, sections)
    bad = mismatches(exps, compile_values(cc, objcopy, c_source(exps), tmp_path))
    assert any(line.startswith("offsetof(struct kvm_run, mmio.len)") for line in bad), bad
    assert any(line.startswith("sizeof(struct kvm_run.mmio.data)") for line in bad), bad
