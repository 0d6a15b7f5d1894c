"""`kvmits probe`: its error paths on a fake filesystem, and the real thing on this host."""

from __future__ import annotations

import errno
import json
import os

import pytest
from pyfakefs import helpers as fake_helpers

from kvmits import uapi
from kvmits.cli import main
from kvmits.cli.probe import FAIL, PASS, can_run_arm64_vms, format_checks, run_checks
from kvmits.errors import KvmError
from tests.conftest import kvm_unavailable_reason


def by_name(checks):
    return {c.name: c for c in checks}


def test_no_dev_kvm(fs):
    checks = by_name(run_checks("/dev/kvm", machine="aarch64"))
    assert checks["kvm device"].status == FAIL
    assert "does not exist" in checks["kvm device"].detail and "EL2" in checks["kvm device"].detail
    assert "API version" not in checks           # nothing after a missing device


def test_permission_denied(fs):
    fs.create_file("/dev/kvm", st_mode=0o100600)
    os.chown("/dev/kvm", 0, 0)
    fake_helpers.set_uid(1000)                    # an ordinary user, not root
    fake_helpers.set_gid(1000)
    try:
        checks = by_name(run_checks("/dev/kvm", machine="aarch64"))
    finally:
        fake_helpers.reset_ids()
    assert checks["kvm device"].status == FAIL
    assert "permission denied" in checks["kvm device"].detail and "kvm" in checks["kvm device"].detail


class FakeKvm:
    """Answers like an x86 /dev/kvm would, without a kernel behind it."""

    def __init__(self, path):
        self.api_version = uapi.KVM_API_VERSION

    def check_extension(self, cap):
        return 1

    def create_vm(self):
        raise KvmError("KVM_CREATE_VM", errno.ENOMEM)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_not_arm64(fs):
    fs.create_file("/dev/kvm")
    checks = run_checks("/dev/kvm", machine="x86_64", kvm_factory=FakeKvm)
    named = by_name(checks)
    assert named["architecture"].status == FAIL and "tools/testbed" in named["architecture"].detail
    assert named["kvm device"].status == PASS
    assert named["generic KVM layer"].status == "WARN" and "KVM_CREATE_VM failed: ENOMEM" in named["generic KVM layer"].detail
    assert not can_run_arm64_vms(checks)
    assert "cannot run its arm64 VMs" in format_checks(checks)


def test_open_failure_is_explained(fs):
    fs.create_file("/dev/kvm")

    def refuse(path):
        raise KvmError(f"open({path})", errno.ENXIO)

    named = by_name(run_checks("/dev/kvm", machine="aarch64", kvm_factory=refuse))
    assert named["kvm device"].status == FAIL and "no KVM driver" in named["kvm device"].detail


@pytest.mark.kvm
def test_probe_on_this_host(capsys):
    if kvm_unavailable_reason():
        pytest.skip(kvm_unavailable_reason())
    rc = main(["probe", "--json"])
    out = json.loads(capsys.readouterr().out)
    statuses = {c["name"]: c["status"] for c in out["checks"]}
    assert statuses["kvm device"] == PASS and statuses["API version"] == PASS
    assert statuses["KVM_CAP_IRQFD"] == PASS and statuses["KVM_CAP_SIGNAL_MSI"] == PASS
    if out["host"] == "aarch64":
        assert statuses["vGICv3"] == PASS and statuses["in-kernel ITS"] == PASS
        assert statuses["KVM_CAP_MSI_DEVID"] == PASS
        assert rc == 0 and out["arm64_vms"] is True
    else:
        assert statuses["generic KVM layer"] == PASS
        assert rc == 1 and out["arm64_vms"] is False
