import math

import numpy as np
import pytest

from raylign.common import statistics as stats

# Student's t


def test_incomplete_beta_matches_closed_forms():
    # I_x(1, 1) = x and I_x(a, 1) = x^a
    assert stats.regularized_incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3, abs=1e-14)
    assert stats.regularized_incomplete_beta(2.5, 1.0, 0.7) == pytest.approx(0.7**2.5, abs=1e-14)
    assert stats.regularized_incomplete_beta(3.0, 2.0, 0.0) == 0.0
    assert stats.regularized_incomplete_beta(3.0, 2.0, 1.0) == 1.0


@pytest.mark.parametrize("t", [0.0, 0.5, 1.0, 3.0, 40.0])
def test_two_sided_t_tail_matches_closed_forms_for_one_and_two_dof(t):
    # dof 1 (Cauchy): 1 - (2/pi) atan|t|; dof 2: 1 - |t| / sqrt(t^2 + 2)
    assert stats.student_t_sf_two_sided(t, 1.0) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)
    assert stats.student_t_sf_two_sided(-t, 2.0) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-12)


def test_t_quantile_matches_tables():
    assert stats.student_t_quantile(0.975, 2) == pytest.approx(4.302652729911275, abs=1e-9)
    assert stats.student_t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), abs=1e-8)
    assert stats.student_t_quantile(0.025, 4) == pytest.approx(-2.7764451051977987, abs=1e-9)
    assert stats.student_t_quantile(0.5, 7) == 0.0


def test_t_distribution_matches_scipy_including_fractional_dof():
    scipy_stats = pytest.importorskip("scipy.stats")
    for dof in (0.7, 1.0, 3.45, 12.0, 150.0):
        for t in (0.01, 0.8, 2.5, 9.0):
            assert stats.student_t_sf_two_sided(t, dof) == pytest.approx(2 * scipy_stats.t.sf(t, dof), rel=1e-9, abs=1e-14)
        for p in (0.005, 0.2, 0.9, 0.975):
            assert stats.student_t_quantile(p, dof) == pytest.approx(scipy_stats.t.ppf(p, dof), rel=1e-9)


# Welch's t-test and Cohen's d


def test_welch_t_test_by_hand_with_two_dof():
    # means 1 and 2, sample variances 2 and 2: se = sqrt(2/2 + 2/2) = sqrt(2), t = -1/sqrt(2),
    # dof = (1 + 1)^2 / (1/1 + 1/1) = 2, p = 1 - |t| / sqrt(t^2 + 2) = 1 - sqrt(0.5 / 2.5)
    result = stats.welch_t_test([0.0, 2.0], [1.0, 3.0])
    assert result.t == pytest.approx(-1 / math.sqrt(2), abs=1e-12)
    assert result.dof == pytest.approx(2.0, abs=1e-12)
    assert result.p_value == pytest.approx(1 - math.sqrt(0.2), abs=1e-12)


def test_welch_t_test_with_unequal_variances_by_hand():
    # a: mean 3, var 2.5, n 5; b: mean 6, var 10, n 5 -> se^2 = 0.5 + 2 = 2.5
    result = stats.welch_t_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert result.t == pytest.approx(-3 / math.sqrt(2.5), abs=1e-12)
    assert result.dof == pytest.approx(2.5**2 / (0.5**2 / 4 + 2.0**2 / 4), abs=1e-12)


def test_welch_t_test_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    for n_a, n_b in ((3, 3), (3, 5), (10, 4)):
        a, b = rng.normal(0.0, 1.0, n_a), rng.normal(0.7, 2.0, n_b)
        ours, theirs = stats.welch_t_test(a, b), scipy_stats.ttest_ind(a, b, equal_var=False)
        assert ours.t == pytest.approx(theirs.statistic, rel=1e-12)
        assert ours.dof == pytest.approx(theirs.df, rel=1e-12)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


def test_welch_t_test_needs_two_seeds_per_method():
    with pytest.raises(ValueError, match="at least 2 independent runs"):
        stats.welch_t_test([0.9], [0.1, 0.2])


def test_welch_t_test_without_any_variance():
    assert stats.welch_t_test([1.0, 1.0], [2.0, 2.0]).t == -math.inf
    assert stats.welch_t_test([1.0, 1.0], [2.0, 2.0]).p_value == 0.0
    assert math.isnan(stats.welch_t_test([1.0, 1.0], [1.0, 1.0]).p_value)


def test_cohens_d_uses_the_pooled_standard_deviation():
    # equal variances 1: d = (2 - 4) / 1
    assert stats.cohens_d([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0, abs=1e-12)
    # a: mean 2, var 1, n 3; b = [2, -2]: mean 0, var 8, n 2; pooled var = (2 * 1 + 1 * 8) / 3 = 10 / 3
    assert stats.cohens_d([1, 2, 3], [2, -2]) == pytest.approx(2 / math.sqrt(10 / 3), abs=1e-12)
    assert stats.cohens_d([5, 5], [3, 3]) == math.inf


# intervals


def test_bootstrap_ci_of_three_seeds_is_their_range():
    # Each extreme resample (all three draws the smallest / largest seed) has probability 1/27 > 2.5 %,
    # so the 95 % percentile interval is exactly [min, max]: too narrow to trust with three seeds.
    interval = stats.bootstrap_ci([0.2, 0.5, 0.6])
    assert (interval.low, interval.high) == pytest.approx((0.2, 0.6), abs=1e-15)


def test_bootstrap_ci_is_seeded_and_degenerate_for_constant_scores():
    values = [0.1, 0.4, 0.35, 0.8, 0.5]
    assert stats.bootstrap_ci(values, seed=7) == stats.bootstrap_ci(values, seed=7)
    assert stats.bootstrap_ci([0.3, 0.3, 0.3]) == stats.Interval(0.3, 0.3)


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    values = np.random.default_rng(0).normal(1.0, 1.0, 30)
    ours = stats.bootstrap_ci(values, n_resamples=20_000, seed=1)
    theirs = scipy_stats.bootstrap((values,), np.mean, method="percentile", n_resamples=20_000, random_state=1)
    # Different random streams: agreement up to Monte-Carlo error (the interval is about 0.7 wide).
    assert ours.low == pytest.approx(theirs.confidence_interval.low, abs=0.02)
    assert ours.high == pytest.approx(theirs.confidence_interval.high, abs=0.02)


def test_t_interval_by_hand_and_against_scipy():
    # mean 0.6, sd 0.1, n 3: 0.6 ± 4.302652729911275 * 0.1 / sqrt(3)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    interval = stats.t_interval([0.5, 0.6, 0.7])
    assert interval.low == pytest.approx(0.6 - half, abs=1e-9)
    assert interval.high == pytest.approx(0.6 + half, abs=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    values = [0.3, 0.9, 0.4, 0.45]
    low, high = scipy_stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy_stats.sem(values))
    ours = stats.t_interval(values)
    assert (ours.low, ours.high) == pytest.approx((low, high), abs=1e-9)


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10), half z sqrt(0.016 + z²/400) / (1 + z²/10)
    interval = stats.wilson_interval(8, 10)
    assert interval.low == pytest.approx(0.4901624715366418, abs=1e-12)
    assert interval.high == pytest.approx(0.9433178485456247, abs=1e-12)
    assert stats.wilson_interval(0, 10).low == pytest.approx(0.0, abs=1e-15)
    assert stats.wilson_interval(10, 10).high == pytest.approx(1.0, abs=1e-15)


def test_wilson_interval_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 5), (3, 7), (41, 100), (100, 100)):
        theirs = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
        ours = stats.wilson_interval(k, n, confidence=0.9)
        assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), abs=1e-12)


def test_win_rate_counts_ties_as_half_or_separately():
    half = stats.win_rate_ci(6, 2, 2, ties_as="half")
    assert half.rate == pytest.approx(0.7)
    assert half.interval == stats.wilson_interval(7.0, 10)
    assert half.tie_rate == pytest.approx(0.2)
    separate = stats.win_rate_ci(6, 2, 2, ties_as="separate")
    assert separate.rate == pytest.approx(0.6)
    assert separate.interval == stats.wilson_interval(6, 10)
    assert separate.tie_interval == stats.wilson_interval(2, 10)
    with pytest.raises(ValueError, match="ties_as"):
        stats.win_rate_ci(1, 1, 1, ties_as="loss")
    with pytest.raises(ValueError, match="at least one judged pair"):
        stats.win_rate_ci(0, 0, 0)


# learning-curve summaries


def test_moving_average_is_a_trailing_mean():
    np.testing.assert_allclose(stats.moving_average([1, 3, 5, 7], 2), [1, 2, 4, 6])
    np.testing.assert_allclose(stats.moving_average([1, 3, 5, 7], 1), [1, 3, 5, 7])


def test_steps_to_threshold_by_hand():
    # 0 1 2 ... 10 then flat at 10: with window 2 the smoothed curve is 0, 0.5, 1.5, ..., 9.5, 10, ...;
    # 80 % of the rise 0 -> 10 is 8, first reached at 8.5 (step index 9; steps are 100, 110, ...).
    values = [min(i, 10) for i in range(20)]
    steps = [100 + 10 * i for i in range(20)]
    assert stats.steps_to_threshold(steps, values, fraction=0.8, window=2) == 190
    assert stats.steps_to_threshold(steps, values, fraction=0.0, window=2) == 100
    # fraction 1: the first step where the smoothed curve sits at its final value
    assert stats.steps_to_threshold(steps, values, fraction=1.0, window=2) == 210


def test_steps_to_threshold_measures_from_the_start_so_negative_rewards_work():
    # -1 rising to +1 over 10 steps: 80 % of the rise is -1 + 1.6 = 0.6, reached at step 8 (window 1)
    values = [-1 + 0.2 * min(i, 10) for i in range(15)]
    assert stats.steps_to_threshold(range(15), values, fraction=0.8, window=1) == 8


def test_steps_to_threshold_follows_a_falling_curve_down():
    losses = [10 - min(i, 10) for i in range(15)]
    assert stats.steps_to_threshold(range(15), losses, fraction=0.5, window=1) == 5


def test_steps_to_threshold_refuses_misaligned_steps():
    with pytest.raises(ValueError, match="steps has 2 entries"):
        stats.steps_to_threshold([0, 1], [0.1, 0.2, 0.3])
