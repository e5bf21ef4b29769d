"""`raylign bench staleness`: the quickstart's reward curve with rollout.max_staleness 0 and 1, side by side.

The same run (configs/quickstart.yaml, evaluation off) at each staleness and seed; both levels use the same
objective (the truncated importance weight with the same cap, which is 1 on-policy), so the only difference
is whether the batch of step t+1 is generated while step t trains. Writes the per-step reward of every run,
the median seconds per step, the reward of the last 10 % of steps per seed, and a plot of both curves.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from raylign.common.config import load_config

IMPORTANCE_SAMPLING_CAP = 2.0


def run_once(staleness: int, seed: int, steps: int, placement: str, workdir: Path, overrides: tuple[str, ...]) -> dict:
    from raylign.cluster.driver import train

    output_dir = workdir / f"staleness_{staleness}" / f"seed_{seed}"
    config = load_config("configs/quickstart.yaml", [
        f"rollout.max_staleness={staleness}", f"algorithm.importance_sampling_cap={IMPORTANCE_SAMPLING_CAP}",
        f"cluster.placement={placement}", f"seed={seed}", f"train.steps={steps}", "eval.every=0",
        "eval.run_test=false", "logging.progress=false", f"output_dir={output_dir}", *overrides,
    ])
    start = time.perf_counter()
    train(config)
    wall = time.perf_counter() - start
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-max(1, len(metrics) // 10):]
    return {
        "seed": seed, "wall_s": wall,
        "step_s_median": statistics.median(m["time/step_s"] for m in metrics[1:]),
        "reward_last_10pct": statistics.fmean(m["reward_mean"] for m in last),
        "staleness_max": max(m["rollout/staleness"] for m in metrics),
        "logprob_gap_max": max(m["rollout/logprob_gap"] for m in metrics),
        "reward_by_step": [m["reward_mean"] for m in metrics],
    }


def plot_curves(result: dict, path: Path, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for label, level in result["levels"].items():
        curves = np.array([run["reward_by_step"] for run in level["runs"]])
        kernel = np.ones(window) / window
        smooth = np.array([np.convolve(curve, kernel, mode="valid") for curve in curves])
        steps = np.arange(window - 1, curves.shape[1])
        mean = smooth.mean(0)
        axis.plot(steps, mean, label=f"max_staleness {label} ({len(curves)} seeds)")
        if len(curves) > 1:
            axis.fill_between(steps, smooth.min(0), smooth.max(0), alpha=0.2)
    axis.set_xlabel("step")
    axis.set_ylabel(f"reward (mean of {window} steps)")
    axis.set_title("quickstart: on-policy vs one step stale (band: min-max over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def bench_staleness(steps: int, seeds: list[int], placement: str, out: str, overrides: tuple[str, ...] = ()) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="raylign-bench-staleness-"))
    result = {
        "benchmark": "staleness",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "workload": f"configs/quickstart.yaml, {steps} steps, evaluation off, importance_sampling_cap "
                    f"{IMPORTANCE_SAMPLING_CAP} at both levels, cluster.placement {placement}"
                    + "".join(f", {override}" for override in overrides),
        "levels": {},
    }
    for staleness in (0, 1):
        runs = [run_once(staleness, seed, steps, placement, workdir, overrides) for seed in seeds]
        finals = [run["reward_last_10pct"] for run in runs]
        result["levels"][str(staleness)] = {
            "reward_last_10pct_mean": statistics.fmean(finals),
            "reward_last_10pct_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "step_s_median": statistics.median(run["step_s_median"] for run in runs),
            "runs": runs,
        }
        Path(out).write_text(json.dumps(result, indent=2))  # partial results survive a later failure
    plot = Path(out).with_suffix(".png")
    plot_curves(result, plot)
    result["plot"] = str(plot)
    Path(out).write_text(json.dumps(result, indent=2))
    return result
