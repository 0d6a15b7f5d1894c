"""Fixtures of the machine tests."""

import signal

import pytest


@pytest.fixture
def kicks(monkeypatch):
    """Redirect the runner's pthread_kill to the FakeVcpu of the thread it targets."""
    runners = []

    def fake_kill(ident, signum):
        for runner in runners:
            for i, t in enumerate(runner._threads):
                if t is not None and t.ident == ident:
                    runner.vcpus[i].kicked.set()
                    return
        raise ProcessLookupError(ident)

    monkeypatch.setattr(signal, "pthread_kill", fake_kill)
    return runners
