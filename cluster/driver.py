"""The single controller: generate, score, learn, publish, log, checkpoint.

Everything the loop needs lives in small helpers below it; the loop itself
reads like the algorithm.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import ray

from raylign.actors.reward_worker import check_invalid_fraction
from raylign.cluster.prompts import PromptSampler
from raylign.cluster.ray_setup import start_ray
from raylign.cluster.reward_pool import RewardPool
from raylign.cluster.rollout_pool import RolloutPool
from raylign.common.config import BUILTIN_MODEL_PREFIX, RunConfig, config_to_yaml
from raylign.common.data import BUILTIN_REVIEWS, load_text_column
from raylign.common.run_logging import RunLogger
from raylign.common.types import Sample
from raylign.learner.learner_worker import LearnerWorker


class SyncError(RuntimeError):
    """The rollout actors are not sampling from the adapter the learner published."""


def train(config: RunConfig) -> dict:
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(config_to_yaml(config))
    start_ray(config)
    model_path = resolve_model_path(config, output_dir)

    learner = ray.remote(LearnerWorker).options(num_cpus=config.train.num_cpus, num_gpus=config.train.num_gpus).remote(
        model_path, config.model, config.train, config.algorithm, config.rollout, config.seed
    )
    sft_metrics = {}
    if config.sft.steps > 0:
        model_path, sft_metrics = warm_start(config, learner, output_dir)
    ray.get(learner.attach_lora.remote())

    rollouts = RolloutPool(config, model_path)
    rewards = RewardPool(config.reward)
    sampler = make_prompt_sampler(config, model_path, output_dir)
    rollouts.publish(learner.publish.remote())
    logger = RunLogger(output_dir, config.model_dump(mode="json"), use_wandb=config.logging.wandb,
                       wandb_project=config.logging.wandb_project, wandb_mode=config.logging.wandb_mode)
    history: list[dict] = []
    run_start = time.perf_counter()
    try:
        for step in progress(range(config.train.steps), config.logging.progress, history):
            step_start = time.perf_counter()
            prompts = sampler.next_batch(config.train.prompts_per_step, step)

            samples = rollouts.generate(prompts)
            generate_done = time.perf_counter()

            scored = rewards.score_batch(samples)
            for sample, value in zip(samples, scored.rewards, strict=True):
                sample.reward = value
            logger.log_reward_errors(step, scored.errors)
            check_invalid_fraction(scored, config.reward.max_invalid_fraction, step)
            valid, group_sizes = valid_samples_and_groups(samples, config.rollout.samples_per_prompt)
            reward_done = time.perf_counter()

            learner_metrics = ray.get(learner.train_step.remote(valid, [s.reward for s in valid], group_sizes))
            check_sync(learner_metrics, config.rollout.sync_tolerance, step)
            learn_done = time.perf_counter()

            publish_seconds = rollouts.publish(learner.publish.remote())

            metrics = {
                "step": step,
                "reward_mean": statistics.fmean(s.reward for s in valid),
                "reward_std": statistics.pstdev(s.reward for s in valid),
                **scored.metrics(),
                **learner_metrics,
                "time/generate_s": generate_done - step_start,
                "time/reward_s": reward_done - generate_done,
                "time/learn_s": learn_done - reward_done,
                "time/learner_compute_s": learner_metrics.pop("learn_seconds"),
                "time/publish_s": publish_seconds,
                "time/step_s": time.perf_counter() - step_start,
            }
            history.append(metrics)
            logger.log_metrics(metrics)
            logger.log_samples(step, samples, config.logging.samples_per_step)
            if config.train.checkpoint_every and (step + 1) % config.train.checkpoint_every == 0:
                checkpoint(learner, rewards, output_dir, step, sampler)
    finally:
        logger.close()
    final_checkpoint = checkpoint(learner, rewards, output_dir, config.train.steps - 1, sampler)
    results = summarise(history, time.perf_counter() - run_start, sft_metrics, final_checkpoint)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def valid_samples_and_groups(samples: list[Sample], group_size: int) -> tuple[list[Sample], list[int]]:
    """Samples with a valid reward, and the sizes of their (now possibly smaller) prompt groups, in order."""
    valid = [(i // group_size, s) for i, s in enumerate(samples) if s.reward is not None]
    sizes: dict[int, int] = {}
    for group, _ in valid:
        sizes[group] = sizes.get(group, 0) + 1
    return [s for _, s in valid], list(sizes.values())


def resolve_model_path(config: RunConfig, output_dir: Path) -> str:
    """Build a built-in tiny model into the run directory; other paths pass through."""
    if not config.model.path.startswith(BUILTIN_MODEL_PREFIX):
        return config.model.path
    from raylign.common.tiny_model import build_tiny_model

    arch = config.model.path[len(BUILTIN_MODEL_PREFIX):].removeprefix("tiny-")
    return str(build_tiny_model(output_dir / "base_model", arch=arch, seed=config.seed))


def warm_start(config: RunConfig, learner, output_dir: Path) -> tuple[str, dict]:
    """Full-parameter SFT on the learner; the result becomes the base model for RL."""
    texts = load_text_column(config.sft.data, config.sft.text_field, data_dir=output_dir / "data")
    sft_dir = str(output_dir / "sft_model")
    metrics = ray.get(learner.sft.remote(texts, config.sft, sft_dir))
    return sft_dir, metrics


def make_prompt_sampler(config: RunConfig, model_path: str, output_dir: Path) -> PromptSampler:
    from transformers import AutoTokenizer

    texts = load_text_column(config.data.prompts, config.data.prompt_field, config.data.split, data_dir=output_dir / "data")
    if config.data.max_prompts is not None:
        texts = texts[: config.data.max_prompts]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    token_ids = [tokenizer(text).input_ids for text in texts]
    return PromptSampler(texts, token_ids, config.seed)


def check_sync(learner_metrics: dict, tolerance: float, step: int) -> None:
    """Stop when behaviour logprobs disagree with the learner's on the same tokens."""
    gap = learner_metrics["rollout/logprob_gap"]
    if gap > tolerance:
        raise SyncError(
            f"step {step}: mean |behaviour - learner| logprob gap is {gap:.3g} (> rollout.sync_tolerance = {tolerance:g}). "
            "The rollout actors are not sampling from the adapter the learner published (a silent weight-sync failure), "
            "or the engines score tokens differently (dtype, truncation). Check the adapter broadcast; raise "
            "rollout.sync_tolerance only if the engines legitimately differ (e.g. bf16)."
        )


def checkpoint(learner, rewards: RewardPool, output_dir: Path, step: int, sampler: PromptSampler) -> str:
    state = {"step": step, "prompt_cursor": asdict(sampler.cursor), "reward_normalizer": rewards.state_dict()}
    return ray.get(learner.save_checkpoint.remote(str(output_dir / "checkpoints" / f"step_{step + 1:06d}"), state))


def summarise(history: list[dict], wall_seconds: float, sft_metrics: dict, final_checkpoint: str) -> dict:
    window = max(1, len(history) // 10)
    timing_keys = [k for k in history[0] if k.startswith("time/")] if history else []
    return {
        "steps": len(history),
        "reward_first_10pct": statistics.fmean(m["reward_mean"] for m in history[:window]),
        "reward_last_10pct": statistics.fmean(m["reward_mean"] for m in history[-window:]),
        "kl_last": history[-1]["kl"],
        "logprob_gap_max": max(m["rollout/logprob_gap"] for m in history),
        "mean_timings": {k: statistics.fmean(m[k] for m in history) for k in timing_keys},
        "wall_seconds": wall_seconds,
        "final_checkpoint": final_checkpoint,
        **sft_metrics,
    }


def progress(steps, enabled: bool, history: list[dict]):
    """Iterate `steps` with a progress bar showing the latest reward and KL."""
    if not enabled:
        yield from steps
        return
    from tqdm import tqdm

    bar = tqdm(steps, desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        yield step
        if history:
            last = history[-1]
            bar.set_postfix(reward=f"{last['reward_mean']:.3f}", kl=f"{last['kl']:.4f}", gap=f"{last['rollout/logprob_gap']:.1e}")
