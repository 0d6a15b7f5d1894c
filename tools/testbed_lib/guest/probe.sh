#!/bin/sh
# `tools/testbed probe`: runs inside the arm64 guest, in the copy of the source tree.
# Says what the guest has (kernel, KVM mode, Python, cffi, fdt) and checks that KVM answers:
# through `python3 -m kvmits probe` once kvmits has that command, else with a minimal
# KVM_GET_API_VERSION through cffi (kvm_api.py beside this file).
echo "== testbed kernel: ${KVMITS_TESTBED_KERNEL:-unknown (not set by tools/testbed)}"
echo "== uname: $(uname -srm)"
echo "== kernel command line: $(cat /proc/cmdline)"
echo "== KVM at boot:"
dmesg | grep -E 'kvm \[[0-9]+\]|GICv3|ITS' | sed 's/^/   /'
if [ ! -c /dev/kvm ]; then
    echo "probe: FAIL: no /dev/kvm (did the kernel start at EL2? see the messages above)"
    exit 1
fi
ls -l /dev/kvm
python3 -c 'import sys, cffi, fdt; print("== python", sys.version.split()[0], "cffi", cffi.__version__, "fdt", getattr(fdt, "__version__", "?"))' || exit 1
if [ -f /opt/kvmits/linux-guest/release ]; then
    echo "== nested Linux guest (kvmits.lab.linux_guest): /opt/kvmits/linux-guest, kernel $(cat /opt/kvmits/linux-guest/release)"
else
    echo "== no nested Linux guest: $(cat /opt/kvmits/linux-guest.missing 2>/dev/null || echo 'nothing at /opt/kvmits/linux-guest')"
fi
if [ -f kvmits/cli/probe.py ]; then
    echo "== python3 -m kvmits probe"
    exec python3 -m kvmits probe
fi
echo "== kvmits has no probe command yet: minimal check"
exec python3 "$(dirname "$0")/kvm_api.py"
