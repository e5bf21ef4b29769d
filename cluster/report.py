"""`raylign report RUN_DIRS... --out DIR`: compare methods across seeds.

Reads finished run directories (``config.yaml``, ``metrics.jsonl``, optional
``results.json`` and ``samples.jsonl``), checks that they ran the same experiment
(:mod:`raylign.common.comparability`), groups them by method and writes

- ``comparison.json``: the controlled fields and their values, and every
  difference allowed (``--allow-different``) or varied (``--vary``) on purpose;
  per method the per-seed final reward, mean, SD, 95 % bootstrap and t
  intervals, steps to threshold, final KL and length, gradient-norm
  statistics; Welch's t-test and Cohen's d for every pair; the final reward of
  GRADE runs per temperature setting (``tau_ablation``) and the reward per
  prompt category (``per_category``);
- ``comparison.tex``: the same as a LaTeX (booktabs) table;
- PNG plots, each skipped (and the report says why) when its inputs are absent;
- ``report.md``: what differs between the runs, then the tables and every plot.

Before grouping, the runs' config.yaml are compared: every run shares the
controlled fields (model, SFT warm start, data, reward sources, sampling, sample
budget, evaluation), and runs of one method differ only in seed, output
directory, runtime settings and the fields named by ``--vary``. A pipeline
stage's paths into its sibling stages (a ``pipeline.yaml`` lies beside the run
directory) are read back as ``{stage}`` references, so one stage run at two
pipeline seeds compares equal.

A run's **method** is ``method`` in its config.yaml when present, else
``algorithm.name``; its **seed** is ``seed``. Its **final reward** is the test
reward from results.json (``test_reward``, ``test/reward_mean`` or
``test.reward_mean``) when every run has one, else the mean training
``reward_mean`` over the last 10 % of steps (the window ``results.json``'s
``reward_last_10pct`` uses). Validation rewards are read from
``val/reward_mean`` or ``val_reward`` in metrics.jsonl. All uncertainty is
across seeds: one final score per run, never the spread of samples in a run.

The **τ ablation** takes the runs whose ``algorithm.name`` is ``grade`` or
``grade_ste``, one series per algorithm, and groups them by
``(algorithm.tau_start, algorithm.tau_end, algorithm.anneal_steps)``, absent
fields at the config defaults. Runs of one method that differ in τ need
``--vary algorithm.tau_start`` (and the other τ fields they vary), or distinct
``method`` names, which they need anyway when they share a seed.

The **per-category reward** of a run is ``test/category/<category>/reward_mean``
from results.json when every run that has categories has them there, else
``val/category/<category>/reward_mean`` in metrics.jsonl averaged over the last
10 % of evaluations, so that no method is scored on a different split.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import yaml

from raylign.common import statistics as stats
from raylign.common.comparability import (SEED_RUN, Comparability, Difference, IncomparableRuns, check_comparable,
                                          method_of, restore_pipeline_references)
from raylign.common.config import AlgorithmConfig

DPI = 100
PANEL_SIZE = (5.0, 4.0)  # inches per panel; a figure with k panels side by side is (5k × 4) in = (500k × 400) px

VALIDATION_KEYS = ("val/reward_mean", "val_reward")
TEST_KEYS = ("test_reward", "test/reward_mean")
GRADE_ALGORITHMS = ("grade", "grade_ste")
TAU_FIELDS = ("tau_start", "tau_end", "anneal_steps")
CATEGORY_KEY = "{split}/category/{category}/reward_mean"  # as cluster/evaluation.py writes them


def _last_tenth(n: int) -> int:
    """How many of ``n`` steps make the final 10 %: the window results.json's reward_last_10pct uses."""
    return max(1, n // 10)


class ReportError(ValueError):
    """Run directories that cannot be compared; the message names the run and the fix."""


@dataclass
class Run:
    path: Path
    method: str
    seed: int
    metrics: list[dict]
    results: dict
    samples_path: Path | None
    config: dict = field(default_factory=dict)
    gradient_variance: list[dict] = field(default_factory=list)  # gradient_variance.jsonl, one row per measurement

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of ``key`` over the steps that logged a finite value for it."""
        rows = [(m["step"], m[key]) for m in self.metrics if isinstance(m.get(key), (int, float))]
        rows = [(s, v) for s, v in rows if math.isfinite(v)]
        return np.array([s for s, _ in rows], dtype=int), np.array([v for _, v in rows], dtype=float)

    def has(self, key: str) -> bool:
        return self.series(key)[0].size > 0

    def tail_mean(self, key: str) -> float | None:
        """Mean of ``key`` over the last 10 % of its logged steps (at least one)."""
        _, values = self.series(key)
        if values.size == 0:
            return None
        return float(values[-_last_tenth(values.size):].mean())

    @property
    def test_reward(self) -> float | None:
        for key in TEST_KEYS:
            if isinstance(self.results.get(key), (int, float)):
                return float(self.results[key])
        nested = self.results.get("test")
        if isinstance(nested, dict) and isinstance(nested.get("reward_mean"), (int, float)):
            return float(nested["reward_mean"])
        return None

    @property
    def validation_key(self) -> str | None:
        return next((key for key in VALIDATION_KEYS if self.has(key)), None)

    @property
    def algorithm(self) -> str | None:
        return (self.config.get("algorithm") or {}).get("name")

    @property
    def tau_setting(self) -> tuple[float, float, int]:
        """(tau_start, tau_end, anneal_steps), absent fields at AlgorithmConfig's defaults."""
        algorithm = self.config.get("algorithm") or {}
        start, end, steps = (algorithm.get(name, AlgorithmConfig.model_fields[name].default) for name in TAU_FIELDS)
        return float(start), float(end), int(steps)

    def categories(self, split: str) -> list[str]:
        """Prompt categories with a reward in results.json (``test``) or in metrics.jsonl (``val``)."""
        prefix, suffix = f"{split}/category/", "/reward_mean"
        keys = self.results if split == "test" else {key for row in self.metrics for key in row}
        return sorted(key[len(prefix):-len(suffix)] for key in keys if key.startswith(prefix) and key.endswith(suffix))

    def category_reward(self, split: str, category: str) -> float | None:
        key = CATEGORY_KEY.format(split=split, category=category)
        if split == "test":
            value = self.results.get(key)
            return float(value) if isinstance(value, (int, float)) else None
        return self.tail_mean(key)


@dataclass
class Comparison:
    """The grouped runs and the report's settings; ``per_run`` is filled by :func:`compare`."""

    groups: dict[str, list[Run]]
    use_test_reward: bool
    threshold: float
    n_resamples: int
    seed: int
    per_run: dict[Path, dict] = field(default_factory=dict)


# loading


def _read_json_lines(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def discover_runs(paths: list[Path]) -> list[Path]:
    """Each path is a run directory, or a folder holding run directories (e.g. one per seed)."""
    found: list[Path] = []
    for path in paths:
        if (path / "config.yaml").is_file():
            found.append(path)
            continue
        nested = sorted(p.parent for p in path.rglob("config.yaml") if (p.parent / "metrics.jsonl").is_file())
        if not nested:
            raise ReportError(f"{path}: no run directory here (a run directory has config.yaml and metrics.jsonl)")
        found.extend(nested)
    return found


def load_run(path: Path) -> Run:
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    method = method_of(config)
    if not method:
        raise ReportError(f"{path}/config.yaml has neither `method` nor `algorithm.name`; add `method: <name>`")
    if not isinstance(config.get("seed"), int):
        raise ReportError(f"{path}/config.yaml: seed = {config.get('seed')!r}; every run needs an integer `seed`")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"{path}: metrics.jsonl is missing; did the run log any step?")
    metrics = _read_json_lines(metrics_path)
    if not metrics:
        raise ReportError(f"{metrics_path} is empty; did the run log any step?")
    results_path = path / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    samples_path = path / "samples.jsonl"
    variance_path = path / "gradient_variance.jsonl"
    return Run(path, str(method), config["seed"], metrics, results, samples_path if samples_path.is_file() else None,
               config, _read_json_lines(variance_path) if variance_path.is_file() else [])


def experiment_config(run: Run) -> dict:
    """The config the comparability check reads: a pipeline stage's artefact paths back as `{stage}` references
    (the stage directory, or for a stage run at several seeds its parent, lies beside pipeline.yaml)."""
    stage_dir = run.path.parent if SEED_RUN.match(run.path.name) else run.path
    if (stage_dir.parent / "pipeline.yaml").is_file():
        return restore_pipeline_references(run.config)
    return run.config


def check_runs(runs: list[Run], vary: Sequence[str] = (), allow_different: Sequence[str] = ()) -> Comparability:
    """Refuse runs that did not run the same experiment (see :func:`check_comparable`)."""
    return check_comparable({str(run.path): experiment_config(run) for run in runs}, vary=vary,
                            allow_different=allow_different)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by method in order of first appearance, each list sorted by seed; a repeated (method, seed) is refused."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        twin = next((other for other in groups.get(run.method, []) if other.seed == run.seed), None)
        if twin is not None:
            raise ReportError(
                f"{twin.path} and {run.path} are both method {run.method!r} with seed {run.seed}; pass each run once, "
                "or tell different settings apart with `method: <name>` in their config.yaml"
            )
        groups.setdefault(run.method, []).append(run)
    return {method: sorted(group, key=lambda r: r.seed) for method, group in groups.items()}


# numbers


def _summary(values: list[float], comparison: Comparison) -> dict:
    """Mean, SD and 95 % intervals of per-seed values; intervals need two seeds."""
    finite = [v for v in values if v is not None]
    out = {"per_seed": values, "mean": float(np.mean(finite)) if finite else None, "std": None,
           "ci95_bootstrap": None, "ci95_t": None}
    if len(finite) >= 2:
        out["std"] = float(np.std(finite, ddof=1))
        boot = stats.bootstrap_ci(finite, 0.95, comparison.n_resamples, comparison.seed)
        out["ci95_bootstrap"] = [boot.low, boot.high]
        t = stats.t_interval(finite, 0.95)
        out["ci95_t"] = [t.low, t.high]
    return out


def _run_numbers(run: Run, comparison: Comparison) -> dict:
    steps, rewards = run.series("reward_mean")
    _, grad_norms = run.series("grad_norm")
    return {
        "seed": run.seed,
        "run_dir": str(run.path),
        "steps": len(run.metrics),
        "final_reward": run.test_reward if comparison.use_test_reward else run.tail_mean("reward_mean"),
        "train_reward_last_10pct": run.tail_mean("reward_mean"),
        "test_reward": run.test_reward,
        "steps_to_threshold": stats.steps_to_threshold(steps, rewards, comparison.threshold) if rewards.size else None,
        "final_kl": run.tail_mean("kl"),
        "final_length": run.tail_mean("response_length_mean"),
        "grad_norm_mean": float(grad_norms.mean()) if grad_norms.size else None,
        "grad_norm_std": float(grad_norms.std(ddof=1)) if grad_norms.size >= 2 else None,
        "val_test_gap": _val_test_gap(run),
        "grad_variance_ratio": _variance_ratio(run),
    }


def _variance_ratio(run: Run) -> float | None:
    """Geometric mean over the run's gradient-variance measurements of tr Cov[g] / ||mean g||^2 (scale-free, so
    methods with different loss scales compare; the ratios span orders of magnitude, hence the geometric mean)."""
    ratios = [row["variance_ratio"] for row in run.gradient_variance
              if isinstance(row.get("variance_ratio"), (int, float)) and row["variance_ratio"] > 0]
    return float(np.exp(np.mean(np.log(ratios)))) if ratios else None


POLICY_GRADIENT_ALGORITHMS = ("ppo", "reinforce", "grpo", "rloo")


def gradient_variance_hypothesis(comparison: Comparison) -> dict | None:
    """Seed grade_imdb's hypothesis 1: GRADE's gradients vary less than REINFORCE's and PPO's.

    Per run, the geometric-mean variance ratio (`_variance_ratio`); per pair (a GRADE method, a policy-gradient
    method), Welch's t-test and Cohen's d on the per-seed log10 ratios. A pair supports the hypothesis when the
    GRADE method's mean log ratio is lower with p < 0.05, contradicts it when higher with p < 0.05, and is
    inconclusive otherwise (or with fewer than 2 seeds on either side). None when no run measured it."""
    ratios: dict[str, list[float]] = {}
    algorithms: dict[str, str | None] = {}
    for method, runs in comparison.groups.items():
        values = [comparison.per_run[r.path]["grad_variance_ratio"] for r in runs]
        values = [v for v in values if v is not None]
        if values:
            ratios[method], algorithms[method] = values, runs[0].algorithm
    if not ratios:
        return None
    grade = [m for m in ratios if algorithms[m] in GRADE_ALGORITHMS]
    policy_gradient = [m for m in ratios if algorithms[m] in POLICY_GRADIENT_ALGORITHMS]
    pairs = []
    for a in grade:
        for b in policy_gradient:
            x, y = np.log10(ratios[a]), np.log10(ratios[b])
            row = {"grade": a, "policy_gradient": b, "n_grade": len(x), "n_policy_gradient": len(y),
                   "log10_ratio_difference": float(x.mean() - y.mean()), "welch_t": None, "p_value": None, "cohens_d": None}
            if len(x) >= 2 and len(y) >= 2:
                test = stats.welch_t_test(x, y)
                row.update(welch_t=test.t, p_value=test.p_value, cohens_d=stats.cohens_d(x, y))
                if test.p_value < 0.05:
                    row["verdict"] = "supported" if row["log10_ratio_difference"] < 0 else "contradicted"
                else:
                    row["verdict"] = "inconclusive (p >= 0.05)"
            else:
                row["verdict"] = "inconclusive (needs 2 seeds or more on each side)"
            pairs.append(row)
    return {
        "hypothesis": "GRADE has lower gradient variance than the policy-gradient methods (seed grade_imdb, hypothesis 1)",
        "measure": ("per run: geometric mean over its gradient_variance.jsonl measurements of tr Cov[g] / ||mean g||^2 "
                    "(independent batches at fixed weights); tested on per-seed log10 values"),
        "methods": {m: {"algorithm": algorithms[m], **_summary(values, comparison)} for m, values in ratios.items()},
        "pairs": pairs,
    }


def _pairwise(a: str, b: str, comparison: Comparison) -> dict:
    x, y = ([comparison.per_run[r.path]["final_reward"] for r in comparison.groups[m]] for m in (a, b))
    x, y = [v for v in x if v is not None], [v for v in y if v is not None]
    out = {"a": a, "b": b, "n_a": len(x), "n_b": len(y),
           "mean_difference": float(np.mean(x) - np.mean(y)) if x and y else None,
           "welch_t": None, "dof": None, "p_value": None, "cohens_d": None}
    if len(x) >= 2 and len(y) >= 2:
        test = stats.welch_t_test(x, y)
        out.update(welch_t=test.t, dof=test.dof, p_value=test.p_value, cohens_d=stats.cohens_d(x, y))
    else:
        out["note"] = "t-test and Cohen's d need at least 2 seeds per method"
    return out


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def tau_ablation(comparison: Comparison) -> list[dict]:
    """Per GRADE algorithm and τ setting (ascending) the per-seed final rewards and their summary."""
    cells: dict[tuple[str, tuple[float, float, int]], list[Run]] = {}
    for runs in comparison.groups.values():
        for run in runs:
            if run.algorithm in GRADE_ALGORITHMS:
                cells.setdefault((run.algorithm, run.tau_setting), []).append(run)
    rows = []
    order = sorted(cells, key=lambda cell: (GRADE_ALGORITHMS.index(cell[0]), cell[1]))
    for algorithm, setting in order:
        runs = sorted(cells[algorithm, setting], key=lambda r: (r.seed, r.method))
        rows.append({
            "algorithm": algorithm,
            **dict(zip(TAU_FIELDS, setting)),
            "seeds": [r.seed for r in runs],
            "methods": sorted({r.method for r in runs}),
            "final_reward": _summary([comparison.per_run[r.path]["final_reward"] for r in runs], comparison),
        })
    return rows


def per_category(comparison: Comparison) -> dict | None:
    """Per method and prompt category the per-seed reward and its summary; None when no run has categories."""
    runs = [run for group in comparison.groups.values() for run in group]
    with_categories = [run for run in runs if run.categories("test") or run.categories("val")]
    if not with_categories:
        return None
    split = "test" if all(run.categories("test") for run in with_categories) else "val"
    categories = sorted({category for run in with_categories for category in run.categories(split)})
    methods = {}
    for method, group in comparison.groups.items():
        group = [run for run in group if run.categories(split)]
        if group:
            methods[method] = {
                "seeds": [run.seed for run in group],
                "categories": {c: _summary([run.category_reward(split, c) for run in group], comparison)
                               for c in categories},
            }
    return {
        "split": "test" if split == "test" else "validation",
        "definition": (
            "test/category/<category>/reward_mean from results.json" if split == "test"
            else "val/category/<category>/reward_mean in metrics.jsonl, mean over the last 10% of evaluations"
        ),
        "categories": categories,
        "methods": methods,
    }


def compare(comparison: Comparison) -> dict:
    for runs in comparison.groups.values():
        for run in runs:
            comparison.per_run[run.path] = _run_numbers(run, comparison)
    methods = {}
    for method, runs in comparison.groups.items():
        numbers = [comparison.per_run[r.path] for r in runs]
        methods[method] = {
            "seeds": [r.seed for r in runs],
            "runs": numbers,
            **{key: _summary([n[key] for n in numbers], comparison)
               for key in ("final_reward", "steps_to_threshold", "final_kl", "final_length", "grad_norm_mean",
                           "grad_norm_std", "val_test_gap", "grad_variance_ratio")},
        }
    return {
        "final_reward_definition": (
            "test reward from results.json" if comparison.use_test_reward
            else "mean training reward_mean over the last 10% of steps"
        ),
        "threshold_fraction": comparison.threshold,
        "steps_to_threshold_definition": (
            f"first step where the reward, smoothed by a trailing mean over 10% of the run, has covered "
            f"{comparison.threshold:.0%} of its rise from its first to its last smoothed value"
        ),
        "uncertainty": "across seeds: SD (ddof 1), 95% percentile bootstrap CI and 95% t interval of the mean",
        "bootstrap": {"resamples": comparison.n_resamples, "seed": comparison.seed},
        "methods": methods,
        "pairwise": [_pairwise(a, b, comparison) for a, b in combinations(comparison.groups, 2)],
        "tau_ablation": tau_ablation(comparison),
        "per_category": per_category(comparison),
        "gradient_variance": gradient_variance_hypothesis(comparison),
    }


# plots


def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _colours(comparison: Comparison) -> dict[str, str]:
    return {method: f"C{i % 10}" for i, method in enumerate(comparison.groups)}


def _seed_curves(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps logged by every run of the method and a [seeds, steps] array of ``key``, smoothed per seed."""
    series = [run.series(key) for run in runs]
    series = [(s, v) for s, v in series if s.size]
    if not series:
        return None
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in series)))
    if not common:
        return None
    window = max(1, len(common) // 20)
    return np.array(common), np.array([stats.moving_average(_at_steps(s, v, common), window) for s, v in series])


def _at_steps(steps: np.ndarray, values: np.ndarray, wanted: list[int]) -> list[float]:
    by_step = dict(zip(steps.tolist(), values.tolist()))
    return [by_step[step] for step in wanted]


def _plot_band(ax, steps, curves, colour, label) -> None:
    mean = curves.mean(axis=0)
    ax.plot(steps, mean, color=colour, label=f"{label} (n={len(curves)})")
    if len(curves) >= 2:
        sd = curves.std(axis=0, ddof=1)
        ax.fill_between(steps, mean - sd, mean + sd, color=colour, alpha=0.2, linewidth=0)


def _error_bar(summary: dict) -> list[list[float]] | None:
    """The 95 % bootstrap CI across seeds as matplotlib's [[below], [above]] the mean; None for one seed."""
    if not summary["ci95_bootstrap"]:
        return None
    low, high = summary["ci95_bootstrap"]
    return [[summary["mean"] - low], [high - summary["mean"]]]


def _bars(ax, comparison: Comparison, key: str, colours: dict[str, str]) -> None:
    """Mean per method with the 95 % bootstrap CI across seeds as error bar and each seed as a dot."""
    per_method = {m: [comparison.per_run[r.path][key] for r in runs] for m, runs in comparison.groups.items()}
    per_method = {m: [v for v in values if v is not None] for m, values in per_method.items()}
    methods = [m for m, values in per_method.items() if values]
    for i, method in enumerate(methods):
        values = per_method[method]
        summary = _summary(values, comparison)
        ax.bar(i, summary["mean"], color=colours[method], alpha=0.6, width=0.6)
        if (error := _error_bar(summary)) is not None:
            ax.errorbar(i, summary["mean"], yerr=error, color="black", capsize=6)
        offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
        ax.scatter(i + np.asarray(offsets), values, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(methods)), methods)
    ax.axhline(0.0, color="grey", linewidth=0.5)


def plot_learning_curves(comparison: Comparison, path: Path) -> str | None:
    panels = [(key, label) for key, label in (("reward_mean", "reward"), ("loss", "loss"), ("kl", "KL to reference"))
              if any(run.has(key) for runs in comparison.groups.values() for run in runs)]
    if not panels:
        return "no run logged reward_mean, loss or kl"
    fig, axes = _figure(len(panels))
    colours = _colours(comparison)
    for ax, (key, label) in zip(axes, panels):
        for method, runs in comparison.groups.items():
            curves = _seed_curves(runs, key)
            if curves is not None:
                _plot_band(ax, *curves, colours[method], method)
        ax.set(title=f"training {label}", xlabel="step", ylabel=label)
        ax.legend(fontsize="small")
    fig.suptitle("Mean across seeds, band ±1 SD across seeds (trailing mean over 5% of steps)", fontsize="small")
    fig.savefig(path)
    return None


def plot_validation_curves(comparison: Comparison, path: Path) -> str | None:
    if not any(run.validation_key for runs in comparison.groups.values() for run in runs):
        return f"no run logged validation rewards ({' or '.join(VALIDATION_KEYS)} in metrics.jsonl)"
    fig, (ax,) = _figure(1)
    colours = _colours(comparison)
    for method, runs in comparison.groups.items():
        keyed = [r for r in runs if r.validation_key]
        if not keyed:
            continue
        steps_values = [r.series(r.validation_key) for r in keyed]
        common = sorted(set.intersection(*(set(s.tolist()) for s, _ in steps_values)))
        if not common:
            continue
        curves = np.array([_at_steps(s, v, common) for s, v in steps_values])
        _plot_band(ax, np.array(common), curves, colours[method], f"{method} val")
        tests = [r.test_reward for r in keyed if r.test_reward is not None]
        if tests:
            ax.axhline(float(np.mean(tests)), color=colours[method], linestyle="--", label=f"{method} test (mean)")
    ax.set(title="Validation reward (test reward dashed)", xlabel="step", ylabel="reward")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return None


def _val_test_gap(run: Run) -> float | None:
    """Validation reward of the evaluated adapter minus its test reward.

    The validation side is ``best_val_reward`` from results.json when logged
    (the test then used the best checkpoint), else the last validation value.
    """
    if run.test_reward is None or run.validation_key is None:
        return None
    best = run.results.get("best_val_reward")
    val = float(best) if isinstance(best, (int, float)) else float(run.series(run.validation_key)[1][-1])
    return val - run.test_reward


def plot_val_test_gap(comparison: Comparison, path: Path) -> str | None:
    if all(n["val_test_gap"] is None for n in comparison.per_run.values()):
        return "needs both validation rewards in metrics.jsonl and a test reward in results.json"
    fig, (ax,) = _figure(1)
    _bars(ax, comparison, "val_test_gap", _colours(comparison))
    ax.set(title="Validation − test reward", ylabel="gap")
    fig.savefig(path)
    return None


def plot_grad_norm(comparison: Comparison, path: Path) -> str | None:
    if not any(run.has("grad_norm") for runs in comparison.groups.values() for run in runs):
        return "no run logged grad_norm"
    fig, (curve_ax, bar_ax) = _figure(2)
    colours = _colours(comparison)
    methods = list(comparison.groups)
    for i, method in enumerate(methods):
        curves = _seed_curves(comparison.groups[method], "grad_norm")
        if curves is None:
            continue
        _plot_band(curve_ax, *curves, colours[method], method)
        for offset, key, hatch in ((-0.2, "grad_norm_mean", None), (0.2, "grad_norm_std", "//")):
            values = [comparison.per_run[r.path][key] for r in comparison.groups[method]]
            values = [v for v in values if v is not None]
            if values:
                bar_ax.bar(i + offset, np.mean(values), width=0.4, color=colours[method], alpha=0.6, hatch=hatch)
                bar_ax.scatter([i + offset] * len(values), values, color="black", s=12, zorder=3)
    curve_ax.set(title="gradient norm (before clipping)", xlabel="step", ylabel="grad norm")
    curve_ax.legend(fontsize="small")
    bar_ax.set_xticks(range(len(methods)), methods)
    bar_ax.set(title="mean and SD (hatched) over steps", ylabel="grad norm")
    fig.savefig(path)
    return None


def plot_steps_to_threshold(comparison: Comparison, path: Path) -> str | None:
    if all(n["steps_to_threshold"] is None for n in comparison.per_run.values()):
        return "no run logged reward_mean"
    fig, (ax,) = _figure(1)
    _bars(ax, comparison, "steps_to_threshold", _colours(comparison))
    ax.set(title=f"Steps to {comparison.threshold:.0%} of the reward rise", ylabel="step")
    fig.savefig(path)
    return None


def plot_final_reward(comparison: Comparison, path: Path) -> str | None:
    if all(n["final_reward"] is None for n in comparison.per_run.values()):
        return "no run has a test reward or logged reward_mean"
    fig, (ax,) = _figure(1)
    _bars(ax, comparison, "final_reward", _colours(comparison))
    what = "Test reward" if comparison.use_test_reward else "Training reward, last 10% of steps"
    ax.set(title=what, ylabel="reward")
    fig.savefig(path)
    return None


def _tau_label(row: dict) -> str:
    return f"τ {row['tau_start']:g}→{row['tau_end']:g}\nover {row['anneal_steps']} steps"


def plot_tau_ablation(comparison: Comparison, path: Path) -> str | None:
    rows = [row for row in tau_ablation(comparison) if row["final_reward"]["mean"] is not None]
    settings = sorted({tuple(row[name] for name in TAU_FIELDS) for row in rows})
    if len(settings) < 2:
        return (f"needs GRADE runs (algorithm.name {' or '.join(GRADE_ALGORITHMS)}) with a final reward at 2 or more "
                f"τ settings ({', '.join(f'algorithm.{name}' for name in TAU_FIELDS)}); found {len(settings)}")
    fig, (ax,) = _figure(1)
    algorithms = [a for a in GRADE_ALGORITHMS if any(row["algorithm"] == a for row in rows)]
    colours = _colours(comparison)
    for i, algorithm in enumerate(algorithms):
        colour = colours.get(algorithm, f"C{(len(colours) + i) % 10}")
        offset = 0.2 * (i - (len(algorithms) - 1) / 2)
        for n, row in enumerate(r for r in rows if r["algorithm"] == algorithm):
            x = settings.index(tuple(row[name] for name in TAU_FIELDS)) + offset
            summary = row["final_reward"]
            values = [v for v in summary["per_seed"] if v is not None]
            ax.scatter([x] * len(values), values, color=colour, alpha=0.5, s=14, zorder=3)
            ax.errorbar(x, summary["mean"], yerr=_error_bar(summary), color=colour, fmt="D", markersize=6,
                        markeredgecolor="black", capsize=5, label=algorithm if n == 0 else None)
    labels = [_tau_label(dict(zip(TAU_FIELDS, setting))) for setting in settings]
    ax.set_xticks(range(len(settings)), labels, fontsize="small")
    ax.set_xlim(-0.5, len(settings) - 0.5)
    ax.set(title="GRADE: final reward per temperature schedule", ylabel="final reward")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return None


def plot_per_category(comparison: Comparison, path: Path) -> str | None:
    numbers = per_category(comparison)
    if numbers is None:
        return ("no run has a reward per prompt category (test/category/<category>/reward_mean in results.json or "
                "val/category/<category>/reward_mean in metrics.jsonl; set data.category_field)")
    fig, (ax,) = _figure(1)
    colours = _colours(comparison)
    methods, categories = numbers["methods"], numbers["categories"]
    width, labelled = 0.8 / len(methods), set()
    for i, (method, m) in enumerate(methods.items()):
        offset = width * (i - (len(methods) - 1) / 2)
        for j, category in enumerate(categories):
            summary = m["categories"][category]
            if summary["mean"] is None:
                continue
            x = j + offset
            ax.bar(x, summary["mean"], width=width, color=colours[method], alpha=0.6,
                   label=None if method in labelled else method)
            labelled.add(method)
            if (error := _error_bar(summary)) is not None:
                ax.errorbar(x, summary["mean"], yerr=error, color="black", capsize=4)
            values = [v for v in summary["per_seed"] if v is not None]
            ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(categories)), categories)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set(title=f"Reward per prompt category ({numbers['split']})", ylabel="reward")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return None


def _pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Methods no other method beats on both lower KL and higher reward, ordered by KL."""
    front = [m for m, (kl, reward) in points.items()
             if not any(k2 <= kl and r2 >= reward and (k2, r2) != (kl, reward) for k2, r2 in points.values())]
    return sorted(front, key=lambda m: points[m][0])


def plot_reward_vs_kl(comparison: Comparison, path: Path) -> str | None:
    numbers = comparison.per_run
    if all(n["final_kl"] is None or n["final_reward"] is None for n in numbers.values()):
        return "no run logged kl"
    fig, (ax,) = _figure(1)
    colours = _colours(comparison)
    means = {}
    for method, runs in comparison.groups.items():
        pairs = [(numbers[r.path]["final_kl"], numbers[r.path]["final_reward"]) for r in runs]
        pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
        if not pairs:
            continue
        kls, rewards = zip(*pairs)
        ax.scatter(kls, rewards, color=colours[method], alpha=0.5, s=18)
        means[method] = (float(np.mean(kls)), float(np.mean(rewards)))
        ax.scatter(*means[method], color=colours[method], marker="D", s=60, edgecolor="black", label=f"{method} (mean)")
    front = _pareto_front(means)
    ax.plot([means[m][0] for m in front], [means[m][1] for m in front], color="black", linestyle=":",
            drawstyle="steps-post", label="Pareto front of the means")
    ax.set(title="Reward vs KL to reference", xlabel="KL, last 10% of steps", ylabel="final reward")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return None


def _late_samples(run: Run) -> list[tuple[float, float]]:
    """(length in tokens, reward) of the logged samples from the last 10 % of steps."""
    if run.samples_path is None:
        return []
    samples = [s for s in _read_json_lines(run.samples_path)
               if isinstance(s.get("num_tokens"), (int, float)) and isinstance(s.get("reward"), (int, float))]
    if not samples:
        return []
    last_step = max(s["step"] for s in samples)
    first_late = last_step + 1 - _last_tenth(last_step + 1)
    return [(float(s["num_tokens"]), float(s["reward"])) for s in samples if s["step"] >= first_late]


def plot_length_vs_reward(comparison: Comparison, path: Path) -> str | None:
    points = {m: [p for r in runs for p in _late_samples(r)] for m, runs in comparison.groups.items()}
    from_samples = any(points.values())
    if not from_samples:
        points = {m: [(comparison.per_run[r.path]["final_length"], comparison.per_run[r.path]["final_reward"])
                      for r in runs if comparison.per_run[r.path]["final_length"] is not None
                      and comparison.per_run[r.path]["final_reward"] is not None]
                  for m, runs in comparison.groups.items()}
    if not any(points.values()):
        return "no samples.jsonl with num_tokens and reward, and no response_length_mean in metrics.jsonl"
    fig, (ax,) = _figure(1)
    colours = _colours(comparison)
    for method, pairs in points.items():
        if not pairs:
            continue
        lengths, rewards = np.array(pairs).T
        label = method
        if len(pairs) >= 3 and lengths.std() > 0 and rewards.std() > 0:
            label += f" (r = {np.corrcoef(lengths, rewards)[0, 1]:+.2f}, n = {len(pairs)})"
        ax.scatter(lengths, rewards, color=colours[method], alpha=0.4 if from_samples else 0.8, s=12, label=label)
    if from_samples:
        ax.set(title="Samples from the last 10% of steps", xlabel="completion tokens", ylabel="reward")
    else:
        ax.set(title="One point per seed", xlabel="mean response length, last 10% of steps", ylabel="final reward")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return None


def plot_gradient_variance(comparison: Comparison, path: Path) -> str | None:
    runs = [run for group in comparison.groups.values() for run in group if run.gradient_variance]
    if not runs:
        return "no run wrote gradient_variance.jsonl (set train.grad_variance_every)"
    fig, (curve_ax, bar_ax) = _figure(2)
    colours = _colours(comparison)
    methods = [m for m, group in comparison.groups.items() if any(r.gradient_variance for r in group)]
    for i, method in enumerate(methods):
        for n, run in enumerate(r for r in comparison.groups[method] if r.gradient_variance):
            rows = [row for row in run.gradient_variance if isinstance(row.get("variance_ratio"), (int, float))]
            curve_ax.plot([row["step"] for row in rows], [row["variance_ratio"] for row in rows], marker="o",
                          color=colours[method], alpha=0.7, label=method if n == 0 else None)
        values = [comparison.per_run[r.path]["grad_variance_ratio"] for r in comparison.groups[method]]
        values = [v for v in values if v is not None]
        if values:
            bar_ax.bar(i, float(np.exp(np.mean(np.log(values)))), color=colours[method], alpha=0.6, width=0.6)
            bar_ax.scatter([i] * len(values), values, color="black", s=14, zorder=3)
    curve_ax.set_yscale("log")
    curve_ax.set(title="tr Cov[g] / ||mean g||² at fixed weights", xlabel="step", ylabel="variance ratio")
    curve_ax.legend(fontsize="small")
    bar_ax.set_yscale("log")
    bar_ax.set_xticks(range(len(methods)), methods)
    bar_ax.set(title="per seed (dots), geometric mean over seeds (bar)", ylabel="variance ratio")
    fig.savefig(path)
    return None


_BARS = "bar: mean over seeds; error bar: 95% bootstrap CI over seeds (two seeds or more); dots: seeds"
# (file, caption in report.md, plot function returning None or why it was skipped)
PLOTS: list[tuple[str, str, Callable[[Comparison, Path], str | None]]] = [
    ("learning_curves.png", "Learning curves: mean across seeds, band ±1 SD across seeds (each method's loss is "
     "its own objective, so loss levels do not compare across methods)", plot_learning_curves),
    ("validation_curves.png", "Validation reward during training; test reward dashed", plot_validation_curves),
    ("val_test_gap.png", f"Generalisation gap, validation minus test reward ({_BARS})", plot_val_test_gap),
    ("grad_norm.png", "Gradient norm: curve across seeds; per-seed mean and SD over steps", plot_grad_norm),
    ("gradient_variance.png", "Gradient variance at fixed weights (hypothesis 1): the scale-free ratio per "
     "measurement and per seed", plot_gradient_variance),
    ("steps_to_threshold.png", f"Sample efficiency, steps to threshold ({_BARS})", plot_steps_to_threshold),
    ("final_reward.png", f"Final reward ({_BARS})", plot_final_reward),
    ("reward_vs_kl.png", "Reward vs KL: seeds (dots), method means (diamonds), Pareto front", plot_reward_vs_kl),
    ("length_vs_reward.png", "Verbosity bias: response length vs reward (r: Pearson correlation)", plot_length_vs_reward),
    ("tau_ablation.png", "GRADE τ ablation: final reward per temperature schedule (diamond: mean over seeds; "
     "error bar: 95% bootstrap CI over seeds; dots: seeds)", plot_tau_ablation),
    ("per_category.png", f"Reward per prompt category ({_BARS})", plot_per_category),
]


# tables


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float) and value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _pm(summary: dict, digits: int = 3) -> str:
    """'mean ± SD', or the mean alone when one seed leaves no SD."""
    if summary["std"] is None:
        return _fmt(summary["mean"], digits)
    return f"{_fmt(summary['mean'], digits)} ± {_fmt(summary['std'], digits)}"


def _interval(interval: list[float] | None) -> str:
    return f"[{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "n/a"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def _latex_number(value, digits: int = 3) -> str:
    text = _fmt(value, digits)
    return "--" if text == "n/a" else f"${text}$"


def _latex_pm(summary: dict, digits: int, bold: bool = False) -> str:
    """'$mean \\pm SD$' (mean in bold for the best method); '--' when there is no mean."""
    if summary["mean"] is None:
        return "--"
    mean = _fmt(summary["mean"], digits)
    text = f"\\mathbf{{{mean}}}" if bold else mean
    if summary["std"] is not None:
        text += f" \\pm {_fmt(summary['std'], digits)}"
    return f"${text}$"


def latex_table(result: dict) -> str:
    methods = result["methods"]
    best = max((m for m in methods if methods[m]["final_reward"]["mean"] is not None),
               key=lambda m: methods[m]["final_reward"]["mean"], default=None)
    threshold = f"{result['threshold_fraction']:.0%}".replace("%", r"\%")
    lines = [
        "% requires \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{Final reward ({_latex_escape(result['final_reward_definition'])}): mean $\\pm$ SD across seeds, "
        f"95\\% percentile bootstrap CI of the mean; steps to {threshold} of the reward rise; "
        "KL over the last 10\\% of steps.}",
        "\\label{tab:comparison}",
        "\\begin{tabular}{lrrrrr}",
        "\\toprule",
        f"Method & Seeds & Final reward & 95\\% CI & Steps to {threshold} & KL \\\\",
        "\\midrule",
    ]
    for method, m in methods.items():
        ci = m["final_reward"]["ci95_bootstrap"]
        cells = [_latex_escape(method), str(len(m["seeds"])), _latex_pm(m["final_reward"], 3, bold=method == best),
                 f"${_interval(ci)}$" if ci else "--", _latex_pm(m["steps_to_threshold"], 1),
                 _latex_number(m["final_kl"]["mean"])]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if result["pairwise"]:
        lines += [
            "",
            "\\medskip",
            "\\begin{tabular}{lrrrrr}",
            "\\toprule",
            "Comparison & $\\Delta$ mean & Welch $t$ & dof & $p$ & Cohen's $d$ \\\\",
            "\\midrule",
        ]
        for pair in result["pairwise"]:
            cells = [_latex_number(pair["mean_difference"]), _latex_number(pair["welch_t"], 2),
                     _latex_number(pair["dof"], 1), _latex_number(pair["p_value"]), _latex_number(pair["cohens_d"], 2)]
            lines.append(f"{_latex_escape(pair['a'])} vs {_latex_escape(pair['b'])} & {' & '.join(cells)} \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def _difference_rows(field: str, values: dict) -> list[str]:
    """Table rows of a field: one per distinct value, with the runs that have it; the field named in the first."""
    rows = []
    for i, (value, runs) in enumerate(Difference(field, values).by_value()):
        shown = json.dumps(value).replace("|", r"\|")  # a pipe would end the table cell, even in backticks
        rows.append(f"| {field if i == 0 else ''} | `{shown}` | {', '.join(f'`{run}`' for run in runs)} |")
    return rows


def comparability_section(comparability: dict, allow_flag: str = "--allow-different", vary_flag: str = "--vary",
                          results_file: str = "comparison.json") -> list[str]:
    """report.md's first section: every difference allowed or varied on purpose, then what was held equal."""
    lines = ["## What differs between the runs", ""]
    kinds = [
        ("allowed_differences", f"Allowed to differ (`{allow_flag}`): these runs differ in more than the method, "
         "so a difference in the numbers below may come from these fields as well."),
        ("varied", f"Varied on purpose within a method (`{vary_flag}`): a method's numbers below pool its runs across "
         "these settings."),
    ]
    for key, note in kinds:
        if comparability[key]:
            lines += [note, "", "| field | value | runs |", "|---|---|---|"]
            for field, values in comparability[key].items():
                lines += _difference_rows(field, values)
            lines.append("")
    if not comparability["allowed_differences"] and not comparability["varied"]:
        lines += ["Nothing: every run shares the controlled fields, and the runs of a method differ only in seed "
                  "and in where and how they ran.", ""]
    lines += [f"Controlled fields, held equal unless listed above: {', '.join(comparability['controlled_fields'])} "
              f"(their values: `comparability.held_equal` in `{results_file}`).", ""]
    return lines


def markdown_report(result: dict) -> str:
    methods = result["methods"]
    threshold = f"{result['threshold_fraction']:.0%}"
    lines = ["# Method comparison", "", *comparability_section(result["comparability"]),
             "## Runs", "", "| method | seeds | run directories |", "|---|---|---|"]
    for method, m in methods.items():
        dirs = ", ".join(f"`{r['run_dir']}`" for r in m["runs"])
        lines.append(f"| {method} | {', '.join(map(str, m['seeds']))} | {dirs} |")
    lines += [
        "", "## Final reward", "",
        f"Final reward: {result['final_reward_definition']}. Uncertainty is across seeds (one final score per run); "
        "the spread of samples within a run is never used as uncertainty. With few seeds the percentile bootstrap "
        "cannot reach beyond the observed seeds and is too narrow; the t interval is the wider, more honest one.",
        "",
        f"| method | seeds | final reward (mean ± SD) | 95% bootstrap CI | 95% t CI | steps to {threshold} | KL | length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, m in methods.items():
        fr = m["final_reward"]
        lines.append(
            f"| {method} | {len(m['seeds'])} | {_pm(fr)} | {_interval(fr['ci95_bootstrap'])} | {_interval(fr['ci95_t'])} | "
            f"{_pm(m['steps_to_threshold'], 1)} | {_fmt(m['final_kl']['mean'])} | {_fmt(m['final_length']['mean'], 1)} |"
        )
    single = [method for method, m in methods.items() if len(m["seeds"]) < 2]
    if single:
        lines += ["", f"Only one seed for {', '.join(single)}: no seed-level uncertainty or test is possible there."]
    lines += ["", f"Steps to threshold: {result['steps_to_threshold_definition']}.", ""]
    if result["pairwise"]:
        lines += ["## Pairwise tests on per-seed final reward", "",
                  "| comparison | Δ mean | Welch t | dof | p (two-sided) | Cohen's d |", "|---|---|---|---|---|---|"]
        for pair in result["pairwise"]:
            lines.append(f"| {pair['a']} vs {pair['b']} | {_fmt(pair['mean_difference'])} | {_fmt(pair['welch_t'], 2)} | "
                         f"{_fmt(pair['dof'], 1)} | {_fmt(pair['p_value'])} | {_fmt(pair['cohens_d'], 2)} |")
        lines += ["", "With few seeds a p-value rarely clears 0.05; Cohen's d gives the size of the difference "
                  "(|d| > 0.8 large, < 0.2 negligible).", ""]
    variance = result.get("gradient_variance")
    if variance is not None:
        lines += ["## Hypothesis 1: gradient variance", "", f"{variance['hypothesis']}. Measure: {variance['measure']}.", "",
                  "| method | algorithm | seeds | variance ratio (mean ± SD over seeds) |", "|---|---|---|---|"]
        for method, m in variance["methods"].items():
            lines.append(f"| {method} | {m['algorithm']} | {len(m['per_seed'])} | {_pm(m)} |")
        if variance["pairs"]:
            lines += ["", "| GRADE method | vs | Δ mean log10 ratio | Welch t | p | Cohen's d | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for pair in variance["pairs"]:
                lines.append(f"| {pair['grade']} | {pair['policy_gradient']} | {_fmt(pair['log10_ratio_difference'])} | "
                             f"{_fmt(pair['welch_t'], 2)} | {_fmt(pair['p_value'])} | {_fmt(pair['cohens_d'], 2)} | "
                             f"{pair['verdict']} |")
        else:
            lines += ["", "No pair to test: the hypothesis needs a GRADE run and a policy-gradient run that both measured it."]
        lines.append("")
    lines += ["LaTeX: `comparison.tex` (booktabs). All numbers: `comparison.json`.", "", "## Plots", ""]
    for name, caption in result["plots"].items():
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    if result["skipped_plots"]:
        lines += ["## Not plotted", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in result["skipped_plots"].items()]
        lines.append("")
    return "\n".join(lines)


# entry points


def write_report(run_dirs: list[Path], out_dir: Path, *, threshold: float = 0.8, n_resamples: int = 10_000,
                 seed: int = 0, vary: Sequence[str] = (), allow_different: Sequence[str] = ()) -> dict:
    """Compare the runs in ``run_dirs`` by method; write comparison.json/.tex, plots and report.md to ``out_dir``.

    Runs that did not run the same experiment are refused (:class:`IncomparableRuns`) unless the fields they
    differ in are named in ``vary`` (within a method) or ``allow_different`` (anywhere).
    Returns what comparison.json holds (non-finite numbers as None).
    """
    if not 0.0 < threshold <= 1.0:
        raise ReportError(f"threshold = {threshold}: give the share of the reward rise as a fraction in (0, 1], e.g. 0.8")
    runs = [load_run(Path(path)) for path in discover_runs([Path(p) for p in run_dirs])]
    comparability = check_runs(runs, vary, allow_different)
    groups = group_runs(runs)
    use_test = all(run.test_reward is not None for run in runs)
    comparison = Comparison(groups, use_test, threshold, n_resamples, seed)
    result = {"comparability": comparability.to_json(), **compare(comparison)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots, skipped = {}, {}
    for name, caption, plot in PLOTS:
        reason = plot(comparison, out_dir / name)
        if reason is None:
            plots[name] = caption
        else:
            skipped[name] = reason
    missing_test = [str(r.path) for r in runs if r.test_reward is None]
    if not use_test and len(missing_test) < len(runs):
        result["warning"] = (f"test reward missing for {', '.join(missing_test)}; all methods are compared on "
                             "training reward so that no method is scored on a different split")
    result["plots"], result["skipped_plots"] = plots, skipped
    result = _finite_or_none(result)
    (out_dir / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "comparison.tex").write_text(latex_table(result))
    (out_dir / "report.md").write_text(markdown_report(result))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `report` command's arguments, for the main `raylign` parser and :func:`report_main` alike."""
    parser.add_argument("run_dirs", nargs="+", type=Path,
                        help="run directories (config.yaml + metrics.jsonl), or folders holding them")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the report to")
    parser.add_argument("--threshold", type=float, default=0.8,
                        help="steps-to-threshold target as a share of each run's reward rise (default 0.8)")
    parser.add_argument("--bootstrap-resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    parser.add_argument("--vary", action="append", default=[], metavar="FIELD",
                        help="a config field varied on purpose between runs of one method, e.g. algorithm.tau_start "
                             "(repeatable; a section such as `algorithm` covers its fields)")
    parser.add_argument("--allow-different", action="append", default=[], metavar="FIELD",
                        help="a config field, controlled or not, allowed to differ anyway, e.g. model.path; listed "
                             "first in report.md (repeatable)")
    return parser


def run_report(args: argparse.Namespace) -> int:
    try:
        result = write_report(args.run_dirs, args.out, threshold=args.threshold, n_resamples=args.bootstrap_resamples,
                              seed=args.seed, vary=args.vary, allow_different=args.allow_different)
    except (ReportError, IncomparableRuns) as exc:
        print(f"raylign report: {exc}", file=sys.stderr)
        return 2
    for method, m in result["methods"].items():
        fr = m["final_reward"]
        print(f"{method}: final reward {_pm(fr)} over seeds {m['seeds']}")
    if result.get("warning"):
        print(f"warning: {result['warning']}", file=sys.stderr)
    print(f"report: {Path(args.out) / 'report.md'} ({len(result['plots'])} plots, {len(result['skipped_plots'])} skipped)")
    return 0


def report_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="raylign report",
        description="Compare methods across seeds: comparison.json, a LaTeX table, PNG plots and report.md.",
    )
    return run_report(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(report_main())
