"""Stop signals: SIGHUP (a closed terminal, a dropped SSH session) stops work as Ctrl-C does, so
cleanups run; one the process ignores (nohup) stays ignored."""

from __future__ import annotations

import os
import signal

import pytest
from fedprefix.common.signals import signals_deferred, stop_signals_as_interrupt


@pytest.fixture
def hangup_default():
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_hangup_or_sigterm_interrupts_as_ctrl_c_does(sig, hangup_default):
    with pytest.raises(KeyboardInterrupt), stop_signals_as_interrupt():
        os.kill(os.getpid(), sig)  # before: SIGHUP ended the process, no cleanup run
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # put back


def test_a_hangup_ignored_under_nohup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals_as_interrupt(), signals_deferred() as received:
            os.kill(os.getpid(), signal.SIGHUP)
        assert received == [] and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_hangup_waits_for_a_deferred_step_then_interrupts(hangup_default):
    with pytest.raises(KeyboardInterrupt), stop_signals_as_interrupt():
        with signals_deferred() as received:
            os.kill(os.getpid(), signal.SIGHUP)
            assert received == [signal.SIGHUP]  # held off: the step goes on
        signal.raise_signal(received[0])
