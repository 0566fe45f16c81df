"""The divergence guard's judgement; its actions on a real run are in test_fault_injection.py."""

import math

from toolkit.training.divergence import DivergenceGuard


def test_nan_and_inf_are_divergences_and_finite_losses_are_not():
    guard = DivergenceGuard()
    assert [guard.check(x) for x in (3.0, 100.0, math.nan, math.inf, -math.inf)] == [None, None, "nan", "inf", "inf"]


def test_a_spike_over_the_recent_median_is_caught_once_the_window_is_full():
    guard = DivergenceGuard(spike_factor=3.0, window=4)
    assert [guard.check(x) for x in (2.0, 1.0, 1.2, 1.0)] == [None] * 4  # 2.0 is the first loss, not a spike
    assert guard.check(3.5) == "spike"  # median 1.1
    assert guard.check(3.0) is None  # the spike did not join the history, so the bar is unchanged
    assert guard.check(9.0) == "spike"


def test_no_spike_check_without_a_factor():
    guard = DivergenceGuard(spike_factor=0.0, window=1)
    assert [guard.check(x) for x in (1.0, 1000.0)] == [None, None]
