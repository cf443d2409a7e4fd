"""Ctrl-C / SIGTERM while training: the first sets a flag (the loop saves and stops), a second Ctrl-C
aborts at once, and the previous handlers come back afterwards."""

from __future__ import annotations

import os
import signal

import pytest

from training.interrupts import GracefulStop, TrainingInterrupted


def test_signals_set_a_flag_then_a_second_ctrl_c_aborts():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler only records it
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupted_message_and_exit_code(tmp_path):
    stop = TrainingInterrupted(signal.SIGTERM, 7, tmp_path / "step_7")
    assert stop.exit_code == 143
    assert str(stop) == (
        f"stopped by SIGTERM after step 7; saved checkpoint {tmp_path / 'step_7'}; "
        f"continue with trainer.resume={tmp_path / 'step_7'}"
    )
