"""aql.training.clock: the two overhead figures and their baselines."""

import pytest

from aql.training.clock import overhead_percent, step_overhead_percent


def test_step_overhead_counts_the_whole_step_against_the_baseline_step():
    # run: 100 steps in 11 s, 1 s of it AQL time; baseline: 50 steps in 5 s (0.1 s per step)
    assert overhead_percent(1.0, 11.0) == pytest.approx(10.0)  # machinery against the run's own rest
    assert step_overhead_percent(11.0, 100, 5.0, 50) == pytest.approx(10.0)
    # a fused loss that makes the rest of the step 5% slower shows only in the step figure
    assert overhead_percent(1.0, 11.5) == pytest.approx(1.0 / 10.5 * 100)
    assert step_overhead_percent(11.5, 100, 5.0, 50) == pytest.approx(15.0)
    assert step_overhead_percent(9.0, 100, 5.0, 50) == pytest.approx(-10.0)


@pytest.mark.parametrize("args", [(1.0, 0, 5.0, 50), (1.0, 10, 5.0, 0), (1.0, 10, 0.0, 50)])
def test_step_overhead_without_steps_is_zero(args):
    assert step_overhead_percent(*args) == 0.0
