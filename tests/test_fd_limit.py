"""kvmits.kvm.eventfd.ensure_fd_limit: room for KVM_MAX_IRQ_ROUTES irqfds past a 1024 soft limit,
in a child process whose limit is lowered first (the test's own process keeps its limit)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, check=False)


def test_4096_eventfds_after_raising_a_1024_soft_limit():
    out = _child("""
        import resource
        from kvmits.kvm import EventFd
        from kvmits.kvm.eventfd import FD_HEADROOM, ensure_fd_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        try:
            [EventFd() for _ in range(1100)]
        except OSError as exc:
            print("before:", exc.errno)
        got = ensure_fd_limit(4096)
        efds = [EventFd() for _ in range(4096)]
        print("after:", got >= 4096 + FD_HEADROOM, len(efds))
    """)
    assert out.returncode == 0, out.stderr
    assert "before: 24" in out.stdout                       # EMFILE at the old limit
    assert "after: True 4096" in out.stdout


def test_a_limit_that_cannot_be_raised_is_named():
    out = _child("""
        import resource
        from kvmits.kvm.eventfd import ensure_fd_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 2048))     # an unprivileged-like cap
        import os
        if os.geteuid() == 0:
            # root may raise the hard limit (CAP_SYS_RESOURCE): drop the capability by asking
            # for more than fs.nr_open allows instead
            need = int(open("/proc/sys/fs/nr_open").read()) + 1
        else:
            need = 4096
        try:
            ensure_fd_limit(need)
        except OSError as exc:
            print("refused:", exc)
    """)
    assert out.returncode == 0, out.stderr
    assert "refused: RLIMIT_NOFILE is 512/2048" in out.stdout and "irqfds" in out.stdout
