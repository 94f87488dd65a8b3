"""StopSignals: a signal only records itself; the waiting thread notices within a poll."""

from __future__ import annotations

import os
import signal
import threading
import time

from meshcontract.stopping import StopSignals


def test_sigterm_ends_the_wait_and_is_recorded():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signals = StopSignals().install()
    try:
        assert not signals.wait(timeout=0.05)  # nothing yet: times out
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.wait(timeout=5)
        assert signals.received == signal.SIGTERM and signals.requested
        started = time.monotonic()
        assert signals.wait(timeout=5) and time.monotonic() - started < 0.5  # stays requested
    finally:
        signals.uninstall()
    assert {sig: signal.getsignal(sig) for sig in previous} == previous


def test_the_stop_event_ends_the_wait_too():
    stop = threading.Event()
    signals = StopSignals(stop)
    threading.Timer(0.05, stop.set).start()
    assert signals.wait(timeout=5)
    assert signals.received is None
