"""Run outputs: metrics.jsonl, samples.jsonl, optional wandb."""

from __future__ import annotations

import json
import math
from pathlib import Path

from raylign.common.types import Sample


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    def __init__(self, output_dir: Path, config_dict: dict, *, use_wandb: bool, wandb_project: str, wandb_mode: str):
        self.output_dir = output_dir
        self.metrics_file = (output_dir / "metrics.jsonl").open("a")
        self.samples_file = (output_dir / "samples.jsonl").open("a")
        self.wandb_run = None
        if use_wandb:
            import wandb

            self.wandb_run = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(output_dir), config=config_dict)

    def log_metrics(self, metrics: dict) -> None:
        self.metrics_file.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=metrics["step"])

    def log_samples(self, step: int, samples: list[Sample], limit: int) -> None:
        for sample in samples[:limit]:
            record = {"step": step, "prompt": sample.prompt, "completion": sample.completion, "reward": sample.reward,
                      "policy_version": sample.policy_version, "finish_reason": sample.finish_reason,
                      "num_tokens": len(sample.completion_ids)}
            self.samples_file.write(json.dumps(record) + "\n")
        self.samples_file.flush()

    def log_reward_errors(self, step: int, errors: list[dict]) -> None:
        """Append invalid-reward records to reward_errors.jsonl (created on the first error)."""
        if not errors:
            return
        with (self.output_dir / "reward_errors.jsonl").open("a") as f:
            for error in errors:
                f.write(json.dumps({"step": step, **error}, default=str) + "\n")

    def close(self) -> None:
        self.metrics_file.close()
        self.samples_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
