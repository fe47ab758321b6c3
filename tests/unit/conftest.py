"""Fixtures shared by the unit tests."""

import signal

import pytest

from launcher.runtime.signals import STOP_SIGNALS


@pytest.fixture
def stop_handlers_restored():
    """cluster.executor's node task installs its own stop-signal handlers and leaves them ignored as it ends;
    the test's are put back afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
