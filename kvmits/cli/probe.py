"""`kvmits probe`: what this host can do for kvmits, one check per line (PASS/WARN/FAIL).

Like a host validation tool: each check says what it found and, when it fails, what to do.
The exit status is 0 only when kvmits can run its arm64 VMs here (arm64 KVM with a vGICv3
and an in-kernel ITS); on other hosts the arm64 work runs in the testbed (tools/testbed).
"""

from __future__ import annotations

import errno
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

from kvmits import uapi
from kvmits.errors import KvmError
from kvmits.kvm import DEFAULT_DEVICE, Kvm

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str


def _open_hint(err: int, path: str) -> str:
    if err == errno.ENOENT:
        return (f"{path} does not exist: KVM is not available. On x86 load kvm_intel or kvm_amd "
                "(and enable virtualization in the firmware); on arm64 the kernel must boot at EL2 "
                "(dmesg | grep kvm says why KVM did not initialise)")
    if err in (errno.EACCES, errno.EPERM):
        return (f"permission denied on {path}: run as root or add your user to the group that owns it "
                "(usually 'kvm': sudo usermod -aG kvm $USER, then log in again)")
    if err in (errno.ENXIO, errno.ENODEV):
        return f"{path} exists but no KVM driver answers: load the kvm module for this CPU"
    return f"cannot open {path}: {os.strerror(err)}"


def run_checks(path: str = DEFAULT_DEVICE, machine: str | None = None, kvm_factory=Kvm) -> list[Check]:
    machine = machine or platform.machine()
    checks: list[Check] = []

    def add(name, status, detail):
        checks.append(Check(name, status, detail))

    arm64 = machine == "aarch64"
    uname = os.uname()
    add("kernel", PASS, f"{uname.release} ({uname.version})")
    if arm64:
        add("architecture", PASS, "aarch64: kvmits runs its arm64 VMs natively here")
    else:
        add("architecture", FAIL, f"{machine}: kvmits' VMs are arm64 guests and need arm64 KVM; on this host "
            "the generic KVM layer is usable, and the arm64 work runs in the testbed: tools/testbed run -- ...")

    if not os.path.exists(path):
        add("kvm device", FAIL, _open_hint(errno.ENOENT, path))
        return checks
    try:
        kvm = kvm_factory(path)
    except KvmError as exc:
        add("kvm device", FAIL, _open_hint(exc.errno, path))
        return checks
    add("kvm device", PASS, f"{path} opened read-write")

    with kvm:
        api = kvm.api_version
        add("API version", PASS if api == uapi.KVM_API_VERSION else FAIL,
            f"KVM_GET_API_VERSION = {api} (kvmits speaks {uapi.KVM_API_VERSION})")
        if api != uapi.KVM_API_VERSION:
            return checks

        def cap(name: str, required: bool, what: str, on=None):
            target = on if on is not None else kvm
            value = target.check_extension(getattr(uapi, name))
            where = "VM fd" if on is not None else "/dev/kvm"
            if value > 0:
                add(name, PASS, f"{value} ({what}; {where})")
            else:
                add(name, FAIL if required else WARN, f"not supported ({what}; {where})")
            return value

        cap("KVM_CAP_IRQFD", True, "eventfd -> interrupt without waking userspace")
        cap("KVM_CAP_IRQ_ROUTING", True, "GSI routing, MSI routes for irqfd")
        cap("KVM_CAP_SIGNAL_MSI", True, "KVM_SIGNAL_MSI")
        cap("KVM_CAP_IMMEDIATE_EXIT", True, "pausing vCPUs with kvm_run.immediate_exit")
        cap("KVM_CAP_ONE_REG", True, "KVM_GET/SET_ONE_REG")
        cap("KVM_CAP_MAX_VCPUS", False, "max vCPUs per VM")
        if arm64:
            cap("KVM_CAP_ARM_VM_IPA_SIZE", False, "max guest-physical address bits")
            cap("KVM_CAP_ARM_PSCI_0_2", True, "PSCI 0.2 CPU_ON/SYSTEM_OFF in the kernel")
            _arm64_gic_checks(kvm, add, cap)
        else:
            _generic_vm_check(kvm, add)
    return checks


def _arm64_gic_checks(kvm, add, cap) -> None:
    try:
        vm = kvm.create_vm()
    except KvmError as exc:
        add("VM", FAIL, str(exc))
        return
    with vm:
        add("VM", PASS, "KVM_CREATE_VM (default IPA size)")
        for name, dev_type in (("vGICv3", uapi.KVM_DEV_TYPE_ARM_VGIC_V3), ("in-kernel ITS", uapi.KVM_DEV_TYPE_ARM_VGIC_ITS)):
            # An ITS can only be created next to a vGICv3: test the GIC, create it, then test the ITS.
            if vm.device_supported(dev_type):
                add(name, PASS, f"KVM_CREATE_DEVICE_TEST type {dev_type} accepted")
            else:
                add(name, FAIL, f"KVM_CREATE_DEVICE_TEST type {dev_type} refused: this kernel has no {name}")
                return
            dev = vm.create_device(dev_type)
        # KVM_CAP_MSI_DEVID is answered per VM, and only once the VM has an ITS (notes/lpi-delivery.md)
        cap("KVM_CAP_MSI_DEVID", True, "MSIs carry a DeviceID (needed by the ITS)", on=vm)
        del dev
    _its_behaviour_check(kvm, add)


def _its_behaviour_check(kvm, add) -> None:
    """The choices of the kernel's ITS where KVM changed between kernels (the userspace ITS
    makes the same ones: kvmits.machine.its.behaviour)."""
    from kvmits.machine.its import behaviour

    try:
        found = behaviour.probe(kvm)
    except KvmError as exc:
        add("ITS behaviour", FAIL, f"the probe of the kernel's ITS failed: {exc}")
        return
    choices = ", ".join(f"{k}={v}" for k, v in found.choices.items())
    if found.expected is None:
        add("ITS behaviour", PASS, f"{choices} (probed; the kernel's version says nothing: not a release)")
    elif found.differences():
        add("ITS behaviour", WARN, f"{choices} (probed; unlike its version: {'; '.join(found.differences())})")
    else:
        add("ITS behaviour", PASS, f"{choices} (probed; as kvmits.its.config.KVM_CHANGES says for this version)")


def _generic_vm_check(kvm, add) -> None:
    """On a non-arm64 host, show that the generic layer (VM, irqchip, MSI routing) works."""
    try:
        with kvm.create_vm() as vm:
            from kvmits.kvm import MsiRoute

            vm.create_irqchip()
            vm.set_gsi_routing([MsiRoute(gsi=0, address=0xFEE00000, data=0x30)])
        add("generic KVM layer", PASS, "VM, in-kernel irqchip and an MSI route accepted")
    except KvmError as exc:
        add("generic KVM layer", WARN, f"{exc}")


def can_run_arm64_vms(checks: list[Check]) -> bool:
    return not any(c.status == FAIL for c in checks)


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"[{c.status}] {c.name:<{width}}  {c.detail}" for c in checks]
    ok = can_run_arm64_vms(checks)
    lines.append("kvmits can run its arm64 VMs on this host." if ok else
                 "kvmits cannot run its arm64 VMs natively on this host (see the FAIL lines).")
    return "\n".join(lines)


def cmd_probe(args) -> int:
    checks = run_checks(args.device)
    ok = can_run_arm64_vms(checks)
    if args.json:
        json.dump({"host": platform.machine(), "arm64_vms": ok, "checks": [asdict(c) for c in checks]},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_checks(checks))
    return 0 if ok else 1


def register(sub) -> None:
    p = sub.add_parser("probe", help="check what this host's KVM can do for kvmits",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", default=DEFAULT_DEVICE, help="the KVM device node (default: %(default)s)")
    p.set_defaults(func=cmd_probe)
