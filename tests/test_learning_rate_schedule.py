import math

import pytest

from raylign.learner.learner_worker import learning_rate_factor


def test_warmup_is_linear_then_constant():
    assert [learning_rate_factor(s, 4, 100, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("schedule, halfway", [("linear", 0.5), ("cosine", 0.5)])
def test_decay_reaches_half_at_the_midpoint_and_zero_at_the_end(schedule, halfway):
    assert math.isclose(learning_rate_factor(50, 0, 100, schedule), halfway, abs_tol=1e-9)
    assert math.isclose(learning_rate_factor(100, 0, 100, schedule), 0.0, abs_tol=1e-9)
    # Cosine stays above linear in the first half.
    assert learning_rate_factor(25, 0, 100, "cosine") > learning_rate_factor(25, 0, 100, "linear")
