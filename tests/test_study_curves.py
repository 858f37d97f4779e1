"""The study's training-loss curve: its smoothing must not lag the loss it draws."""

import pytest

from sinkdlm.experiments.study_report import _smooth

STEP_AT = 50
POINTS = 200


def first_below(values: list[float], level: float) -> int:
    return next(i for i, v in enumerate(values) if v < level)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_the_smoothed_loss_of_a_step_crosses_its_midpoint_at_the_step(noise):
    """A loss that drops from 2 to 1 at point 50: the smoothed curve is below 1.5 from point 50 on (the
    exponential average drawn before crossed 7 points late, so training looked slower than it was)."""
    wobble = [noise * (-1) ** i for i in range(POINTS)]  # alternating: its centred mean is ~0
    loss = [(2.0 if i < STEP_AT else 1.0) + w for i, w in enumerate(wobble)]
    smooth = _smooth(loss)
    assert abs(first_below(smooth, 1.5) - STEP_AT) <= 1
    assert smooth[0] == pytest.approx(loss[0]) and smooth[-1] == pytest.approx(loss[-1])  # no lag at the ends
    assert max(abs(s - round(s)) for s in smooth[10:40] + smooth[60:190]) <= noise / 4  # it does smooth
    flat = [3.0] * POINTS
    assert _smooth(flat) == flat
