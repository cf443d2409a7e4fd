"""The KL coefficient controller: fixed stays put; adaptive follows Ziegler et al.'s clipped proportional rule."""

from __future__ import annotations

import pytest

from algorithms.kl_control import KLController


def test_fixed_never_moves():
    ctl = KLController(0.1)
    assert ctl.update(100.0, n_steps=64) == 0.1


@pytest.mark.parametrize("kl, expected_error", [(12.0, 0.2), (6.6, 0.1), (0.0, -0.2)])
def test_adaptive_rule(kl, expected_error):
    ctl = KLController(0.1, adaptive=True, target=6.0, horizon=1000)
    assert ctl.update(kl, n_steps=100) == pytest.approx(0.1 * (1 + expected_error * 100 / 1000))


def test_state_round_trip():
    ctl = KLController(0.1, adaptive=True, target=1.0, horizon=10)
    ctl.update(5.0, n_steps=10)
    twin = KLController(0.1, adaptive=True, target=1.0, horizon=10)
    twin.load_state_dict(ctl.state_dict())
    assert twin.value == ctl.value == pytest.approx(0.12)
