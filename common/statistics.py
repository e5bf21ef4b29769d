"""Statistics for comparing methods across seeds: tests, effect sizes, intervals.

Pure functions on plain sequences of floats: no files, no plotting.

The unit of evidence is the **seed**. Functions that measure uncertainty take
one number per independent run (its final score), never the per-sample
rewards inside a run: the spread of samples within one run says nothing about
how much the result would move with another seed, and presenting it as if it
did makes every difference look significant.

Student's t distribution is computed here (regularised incomplete beta by
continued fraction) so the module needs only numpy; the tests check it against
scipy where scipy is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal, Sequence

import numpy as np


@dataclass(frozen=True)
class TTest:
    """Welch's unequal-variance t-test of mean(a) - mean(b)."""

    t: float
    dof: float
    p_value: float  # two-sided


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class WinRate:
    """A judge's win rate against a baseline with its confidence interval.

    ``ties_as="half"``: ``rate = (wins + ties / 2) / n``; ``"separate"``:
    ``rate = wins / n`` and ``tie_rate`` carries the ties (its own interval in
    ``tie_interval``). In both, ``n = wins + losses + ties``.
    """

    rate: float
    interval: Interval
    tie_rate: float
    tie_interval: Interval
    n: int
    ties_as: str


def _as_array(values: Sequence[float], name: str, min_size: int) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of per-seed scores, got shape {array.shape}")
    if array.size < min_size:
        raise ValueError(
            f"{name} has {array.size} value(s); this needs at least {min_size} independent runs (seeds)"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values: {array.tolist()}")
    return array


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz; Numerical Recipes `betacf`)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of a Beta(a, b) variable at x."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x = {x} must lie in [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast only on one side of the mean; use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def student_t_sf_two_sided(t: float, dof: float) -> float:
    """P(|T| >= |t|) for Student's t with ``dof`` (possibly fractional) degrees of freedom."""
    if dof <= 0:
        raise ValueError(f"dof = {dof} must be positive")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))


def student_t_quantile(probability: float, dof: float) -> float:
    """The ``probability`` quantile of Student's t (inverse CDF, by bisection on the CDF)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability = {probability} must lie in (0, 1)")
    if probability == 0.5:
        return 0.0
    tail = min(probability, 1.0 - probability)
    low, high = 0.0, 1.0
    while student_t_sf_two_sided(high, dof) / 2.0 > tail:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if student_t_sf_two_sided(mid, dof) / 2.0 > tail:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    quantile = (low + high) / 2.0
    return quantile if probability > 0.5 else -quantile


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Welch's t-test on per-seed final scores of two methods (two-sided).

    t = (mean_a - mean_b) / sqrt(var_a/n_a + var_b/n_b), sample variances
    (ddof 1), Welch–Satterthwaite degrees of freedom. When both groups have
    zero variance the test is undefined: t is ±inf (p = 0) if the means
    differ and NaN (p NaN, dof NaN) if they are equal.
    """
    x, y = _as_array(a, "a", 2), _as_array(b, "b", 2)
    va, vb = float(x.var(ddof=1)) / x.size, float(y.var(ddof=1)) / y.size
    difference = float(x.mean() - y.mean())
    if va + vb == 0.0:
        if difference == 0.0:
            return TTest(math.nan, math.nan, math.nan)
        return TTest(math.copysign(math.inf, difference), math.nan, 0.0)
    t = difference / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    return TTest(t, dof, student_t_sf_two_sided(t, dof))


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
    """(mean_a - mean_b) / pooled SD, pooled SD = sqrt(((n_a-1) s_a² + (n_b-1) s_b²) / (n_a + n_b - 2)).

    Zero pooled SD gives ±inf when the means differ and NaN when they do not.
    """
    x, y = _as_array(a, "a", 2), _as_array(b, "b", 2)
    pooled = math.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2))
    difference = float(x.mean() - y.mean())
    if pooled == 0.0:
        return math.nan if difference == 0.0 else math.copysign(math.inf, difference)
    return difference / pooled


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of per-seed scores.

    Resamples the seeds with replacement ``n_resamples`` times (numpy
    ``default_rng(seed)``, so the interval is reproducible) and takes the
    (1-confidence)/2 and (1+confidence)/2 quantiles of the resampled means.
    With few seeds it cannot reach beyond the observed values and is too
    narrow; read it next to :func:`t_interval`.
    """
    x = _as_array(values, "values", 2)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence = {confidence} must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return Interval(float(low), float(high))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n) over per-seed scores."""
    x = _as_array(values, "values", 2)
    half = student_t_quantile((1.0 + confidence) / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return Interval(float(x.mean() - half), float(x.mean() + half))


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion ``successes / n``.

    ``successes`` may be fractional (ties counted as half a win); the interval
    then treats the half-counts like whole ones, a common approximation.
    """
    if n <= 0:
        raise ValueError(f"n = {n}: a rate needs at least one judged pair")
    if not 0.0 <= successes <= n:
        raise ValueError(f"successes = {successes} must lie in [0, n = {n}]")
    z = NormalDist().inv_cdf((1.0 + confidence) / 2.0)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def win_rate_ci(
    wins: int, losses: int, ties: int, *, ties_as: Literal["half", "separate"] = "half", confidence: float = 0.95
) -> WinRate:
    """Judge win rate against a baseline with a Wilson interval; see :class:`WinRate` for ``ties_as``.

    A pair judged in both orders whose verdicts disagree is a tie (position
    bias), so ties are common; ``"half"`` gives the usual single number,
    ``"separate"`` keeps wins strict and reports ties on their own.
    """
    if min(wins, losses, ties) < 0:
        raise ValueError(f"counts must be non-negative, got wins={wins}, losses={losses}, ties={ties}")
    if ties_as not in ("half", "separate"):
        raise ValueError(f"ties_as = {ties_as!r}: use 'half' or 'separate'")
    n = wins + losses + ties
    successes = wins + ties / 2.0 if ties_as == "half" else float(wins)
    return WinRate(
        rate=successes / n if n else math.nan,
        interval=wilson_interval(successes, n, confidence),
        tie_rate=ties / n if n else math.nan,
        tie_interval=wilson_interval(ties, n, confidence),
        n=n,
        ties_as=ties_as,
    )


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean: element i is the mean of values[max(0, i-window+1) : i+1]."""
    if window < 1:
        raise ValueError(f"window = {window} must be at least 1")
    x = np.asarray(values, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(x)])
    ends = np.arange(1, x.size + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def steps_to_threshold(
    steps: Sequence[int], values: Sequence[float], fraction: float = 0.8, window: int | None = None
) -> int:
    """First step at which the smoothed curve has covered ``fraction`` of its own rise.

    The curve is smoothed with a trailing moving average (``window``, default
    a tenth of the run, at least 1). With ``start`` and ``final`` the first and
    last smoothed values, the target is ``start + fraction · (final - start)``
    and the answer is the first step whose smoothed value reaches it (from
    below for a rising curve, from above for a falling one such as a loss).

    For a reward that starts at 0 this is "``fraction`` of the final value";
    measuring from the start makes it independent of where the reward scale
    puts zero (sentiment rewards start negative). A run that never improves
    reaches its own target at once, so read this next to the final reward.
    """
    x = _as_array(values, "values", 1)
    step_array = np.asarray(steps)
    if step_array.shape != x.shape:
        raise ValueError(f"steps has {step_array.size} entries but values has {x.size}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction = {fraction} must lie in [0, 1]")
    smoothed = moving_average(x, window if window is not None else max(1, x.size // 10))
    start, final = smoothed[0], smoothed[-1]
    target = start + fraction * (final - start)
    # Rounding in `target` must not stop the final point itself from reaching it.
    slack = 1e-12 * max(1.0, abs(start), abs(final))
    reached = smoothed >= target - slack if final >= start else smoothed <= target + slack
    # The last point always meets the target, so argmax finds a True.
    return int(step_array[int(np.argmax(reached))])
