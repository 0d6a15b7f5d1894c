"""The generated device tree, parsed back (and decompiled by dtc when it is installed)."""

import shutil
import subprocess

import fdt
import pytest

from kvmits.machine.devicetree import MAX_DTB_SIZE, Initrd, build_dtb
from kvmits.machine.memmap import MemoryMap

MPIDRS4 = [0x80000000, 0x80000001, 0x80000002, 0x80000003]


def parse(blob):
    return fdt.parse_dtb(blob)


def words(tree, path, name):
    return list(tree.get_property(name, path).data)


def strings(tree, path, name):
    return list(tree.get_property(name, path).data)


def u64(cells):
    return (cells[0] << 32) | cells[1]


@pytest.fixture
def tree():
    blob = build_dtb(MemoryMap(4, 512 << 20), MPIDRS4, its=True, bootargs="console=ttyAMA0 earlycon",
                     initrd=Initrd(0x48400000, 0x48500000))
    assert blob[:4] == b"\xd0\x0d\xfe\xed"
    return parse(blob)


def test_root_and_memory(tree):
    assert words(tree, "/", "#address-cells") == [2] and words(tree, "/", "#size-cells") == [2]
    assert words(tree, "/", "interrupt-parent") == [words(tree, "/intc@8000000", "phandle")[0]]
    assert strings(tree, "/memory@40000000", "device_type") == ["memory"]
    assert words(tree, "/memory@40000000", "reg") == [0, 0x40000000, 0, 512 << 20]


def test_cpus_have_mpidr_reg_and_psci(tree):
    cpus = tree.get_node("/cpus")
    assert words(tree, "/cpus", "#address-cells") == [1] and words(tree, "/cpus", "#size-cells") == [0]
    assert [n.name for n in cpus.nodes] == ["cpu@0", "cpu@1", "cpu@2", "cpu@3"]
    for i, node in enumerate(cpus.nodes):
        assert list(node.get_property("reg").data) == [i]          # affinity only, RES1 bit 31 dropped
        assert list(node.get_property("enable-method").data) == ["psci"]
        assert list(node.get_property("device_type").data) == ["cpu"]
    assert strings(tree, "/psci", "compatible") == ["arm,psci-0.2"]
    assert strings(tree, "/psci", "method") == ["hvc"]


def test_gic_with_its_child(tree):
    gic = "/intc@8000000"
    assert strings(tree, gic, "compatible") == ["arm,gic-v3"]
    assert tree.exist_property("interrupt-controller", gic)
    assert words(tree, gic, "#interrupt-cells") == [3]
    reg = words(tree, gic, "reg")
    assert [u64(reg[0:2]), u64(reg[2:4]), u64(reg[4:6]), u64(reg[6:8])] == [0x08000000, 0x10000, 0x080A0000, 4 * 0x20000]
    its = gic + "/msi-controller@8080000"
    assert strings(tree, its, "compatible") == ["arm,gic-v3-its"]
    assert tree.exist_property("msi-controller", its)
    assert words(tree, its, "#msi-cells") == [1]
    assert words(tree, its, "reg") == [0, 0x08080000, 0, 0x20000]


def test_no_its_node_without_an_its():
    tree = parse(build_dtb(MemoryMap(1, 64 << 20), [0x80000000], its=False))
    assert [n.name for n in tree.get_node("/intc@8000000").nodes] == []
    assert not tree.exist_node("/chosen/linux,initrd-start")
    assert not tree.exist_property("linux,initrd-start", "/chosen")


def test_timer_uart_clock_and_chosen(tree):
    assert strings(tree, "/timer", "compatible") == ["arm,armv8-timer"]
    assert words(tree, "/timer", "interrupts") == [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
    uart = "/pl011@9000000"
    assert strings(tree, uart, "compatible") == ["arm,pl011", "arm,primecell"]
    assert words(tree, uart, "reg") == [0, 0x09000000, 0, 0x1000]
    assert words(tree, uart, "interrupts") == [0, 1, 4]                  # SPI 1 = INTID 33, level high
    clk = words(tree, "/apb-pclk", "phandle")[0]
    assert words(tree, uart, "clocks") == [clk, clk]
    assert strings(tree, uart, "clock-names") == ["uartclk", "apb_pclk"]
    assert strings(tree, "/apb-pclk", "compatible") == ["fixed-clock"]
    assert strings(tree, "/chosen", "bootargs") == ["console=ttyAMA0 earlycon"]
    assert strings(tree, "/chosen", "stdout-path") == ["/pl011@9000000"]
    assert u64(words(tree, "/chosen", "linux,initrd-start")) == 0x48400000
    assert u64(words(tree, "/chosen", "linux,initrd-end")) == 0x48500000


def test_phandles_are_unique_and_resolve(tree):
    handles = {}
    for path, _nodes, props in tree.walk():
        for p in props:
            if p.name == "phandle":
                assert p.value not in handles, f"phandle {p.value} twice"
                handles[p.value] = path
    assert set(handles.values()) == {"/intc@8000000", "/intc@8000000/msi-controller@8080000", "/apb-pclk"}


def test_cpu_reg_uses_two_cells_when_aff3_is_set():
    tree = parse(build_dtb(MemoryMap(2, 64 << 20), [0x80000000, (1 << 32) | 0x80000000], its=False))
    assert words(tree, "/cpus", "#address-cells") == [2]
    assert [list(n.get_property("reg").data) for n in tree.get_node("/cpus").nodes] == [[0, 0], [1, 0]]


def test_mpidr_count_must_match_cpus():
    with pytest.raises(ValueError):
        build_dtb(MemoryMap(2, 64 << 20), [0x80000000], its=False)


def test_empty_bootargs_is_a_valid_string():
    blob = build_dtb(MemoryMap(1, 64 << 20), [0x80000000], its=True, bootargs="")
    assert len(blob) < MAX_DTB_SIZE
    assert bytes(parse(blob).get_property("bootargs", "/chosen").data) == b"\0"


def test_dtc_decompiles_without_warnings(tmp_path):
    dtc = shutil.which("dtc")
    if dtc is None:
        pytest.skip("dtc not installed (Debian package device-tree-compiler); the tree is still checked "
                    "by parsing it back with fdt above")
    blob = tmp_path / "m.dtb"
    blob.write_bytes(build_dtb(MemoryMap(4, 512 << 20), MPIDRS4, its=True, bootargs="console=ttyAMA0",
                               initrd=Initrd(0x48400000, 0x48500000)))
    out = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(blob)], capture_output=True, text=True, check=True)
    assert out.stderr == "", out.stderr
    assert "arm,gic-v3-its" in out.stdout and "msi-controller;" in out.stdout


def test_pcie_host_bridge_with_msi_map_to_the_its():
    mm = MemoryMap(4, 512 << 20)
    tree = parse(build_dtb(mm, MPIDRS4, its=True, pci=True))
    node = "/pcie@3f000000"
    assert strings(tree, node, "compatible") == ["pci-host-ecam-generic"]
    assert strings(tree, node, "device_type") == ["pci"]
    assert words(tree, node, "#address-cells") == [3] and words(tree, node, "#size-cells") == [2]
    assert words(tree, node, "bus-range") == [0, 0]
    assert tree.exist_property("dma-coherent", node)
    assert words(tree, node, "reg") == [0, 0x3F000000, 0, 1 << 20]            # 1 MiB of ECAM: bus 0
    # one 32-bit memory range, identity-mapped, QEMU virt's window
    assert words(tree, node, "ranges") == [0x02000000, 0, 0x10000000, 0, 0x10000000, 0, 0x2EFF0000]
    its_phandle = words(tree, "/intc@8000000/msi-controller@8080000", "phandle")[0]
    assert words(tree, node, "msi-map") == [0, its_phandle, 0, 0x100]        # RID = DeviceID
    assert not parse(build_dtb(mm, MPIDRS4, its=True)).exist_node(node)


def test_pcie_needs_an_its():
    with pytest.raises(ValueError, match="needs an ITS"):
        build_dtb(MemoryMap(1, 64 << 20), MPIDRS4[:1], its=False, pci=True)
