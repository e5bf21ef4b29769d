"""The single controller: generate, score, learn, publish, log, checkpoint.

Everything the loop needs lives in small helpers below it; the loop itself
reads like the algorithm.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import ray

from raylign.actors.reward_worker import check_invalid_fraction
from raylign.cluster.console import actor_log_dir, run_console
from raylign.cluster.evaluation import EvalPrompts, Evaluator, load_eval_prompts
from raylign.cluster.learner_group import LearnerGroup
from raylign.cluster.placement import actor_env_vars, with_threads
from raylign.cluster.prompts import PromptCursor, PromptEncoder, PromptSampler
from raylign.cluster.ray_setup import start_ray
from raylign.cluster.reward_pool import RewardPool
from raylign.cluster.rollout_pool import RolloutPool
from raylign.cluster.warm_actors import keeping_actors
from raylign.common.config import ConfigError, RunConfig, RunStopped, config_to_yaml
from raylign.common.data import load_columns, load_text_column
from raylign.common.engine_support import EnginePlan, engine_plan
from raylign.common.model_checks import check_has_tokenizer, check_lora_targets, hub_model_architecture
from raylign.common.preflight import check_run_inputs
from raylign.common.run_logging import RunLogger
from raylign.common.statistics import steps_to_threshold
from raylign.common.tiny_model import resolve_builtin_model
from raylign.common.types import Sample


class SyncError(RunStopped):
    """The rollout actors are not sampling from the adapter the learner published."""


def train_each_seed(config: RunConfig) -> list[dict]:
    """`seeds: [...]` runs the experiment once per seed into output_dir/seed_<s>, each seed on the actors the
    previous one used (reset in place, cluster/warm_actors.py); otherwise one run."""
    if not config.seeds:
        return [train(config)]
    with keeping_actors():
        return [
            train(config.model_copy(update={"seed": seed, "seeds": None, "output_dir": str(Path(config.output_dir) / f"seed_{seed}")}))
            for seed in config.seeds
        ]


def train(config: RunConfig) -> dict:
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = with_threads(config)
    (output_dir / "config.yaml").write_text(config_to_yaml(config))
    with run_console(config, output_dir):
        inputs = read_inputs(config, output_dir)  # before Ray: a bad input costs no reservation
        start_ray(config)
        releases: list = []
        try:
            return run_training(inputs, output_dir, releases)
        finally:
            # Free the CPU/GPU reservations even when the run fails, so a shared Ray can go on.
            for release in releases:
                release()


@dataclass
class RunInputs:
    """What the driver reads and checks before Ray starts."""

    config: RunConfig  # with rollout.backend and rollout.weight_sync decided
    engine: EnginePlan
    model_path: str
    encoder: PromptEncoder
    sampler: PromptSampler
    probe_sampler: PromptSampler
    eval_prompts: EvalPrompts
    resume: dict | None


def read_inputs(config: RunConfig, output_dir: Path) -> RunInputs:
    """The pre-flight checks (common/preflight.py), the model, the engine plan and every prompt set; anything
    the user got wrong is a ConfigError here, before any actor starts."""
    with user_errors():
        check_run_inputs(config, output_dir / "data")
    model_path = resolve_model_path(config, output_dir)
    config, engine = prepare_run(config, model_path)
    # Every prompt set is tokenised and fitted to the budget before any actor starts: a set that cannot fit is
    # refused now, not after the warm start. The warm-started model keeps the base model's tokenizer.
    with user_errors():
        encoder = PromptEncoder(config, model_path)
        sampler = make_prompt_sampler(config, encoder, output_dir)
        # Gradient-variance probes draw their own prompts, so measuring never changes what training sees.
        probe_sampler = make_prompt_sampler(config, encoder, output_dir, seed=config.seed + 7919)
        eval_prompts = load_eval_prompts(config, output_dir, encoder)
        resume = read_resume_state(config, output_dir)
    print(f"[raylign] rollout engine: {engine.backend}, weight sync {engine.weight_sync} ({engine.reason})",
          file=sys.stderr, flush=True)
    return RunInputs(config, engine, model_path, encoder, sampler, probe_sampler, eval_prompts, resume)


def run_training(inputs: RunInputs, output_dir: Path, releases: list) -> dict:
    config, engine, model_path, encoder = inputs.config, inputs.engine, inputs.model_path, inputs.encoder
    sampler, probe_sampler, eval_prompts, resume = inputs.sampler, inputs.probe_sampler, inputs.eval_prompts, inputs.resume
    if resume is not None and config.sft.steps > 0:
        model_path = str(output_dir / "sft_model")  # the warm-started base the checkpoint's adapter belongs to

    # The actors start side by side (each spends seconds importing its libraries and loading its model): the
    # reward actors at once, the rollout actors as soon as the model they sample exists, while the learner
    # loads. Only rollout actors that may share a GPU with the learner wait for it, so that vLLM's memory
    # profile sees the learner's weights and adapter.
    rewards = RewardPool(config.reward, log_dir=actor_log_dir(config), env_vars=actor_env_vars(config))
    releases.append(rewards.release)
    learners = LearnerGroup(config, model_path)
    releases.append(learners.release)
    sft_metrics = {}
    if config.sft.steps > 0 and resume is None:
        model_path, sft_metrics = warm_start(config, learners, output_dir)
    shared_gpu = may_share_a_gpu(config)
    if shared_gpu:  # everything the learner puts on the GPU (GRADE's reward model too) is there before vLLM starts
        learners.attach_lora()
    rollouts = RolloutPool(config, model_path, max_model_len=encoder.max_model_len())
    releases.append(rollouts.release)
    if not shared_gpu:
        learners.attach_lora()
    evaluator = Evaluator(config, output_dir, rollouts, rewards, learners.leader, eval_prompts)
    history: list[dict] = []
    first_step = 0
    # Batches generated (and scored) ahead of the step that trains on them: at most rollout.max_staleness.
    ahead: deque[RolloutBatch] = deque()
    if resume is not None:
        first_step, history = restore_run(config.train.resume_from, output_dir, resume, learners, rewards, sampler,
                                          probe_sampler, evaluator)
        ahead.extend(RolloutBatch.from_state(state) for state in resume.get("batches_ahead", []))
    policy = learners.publish()
    rollouts.publish(policy)
    logger = RunLogger(output_dir, config.model_dump(mode="json"), use_wandb=config.logging.wandb,
                       wandb_project=config.logging.wandb_project, wandb_mode=config.logging.wandb_mode)

    def rollout_batch(step: int) -> RolloutBatch:
        """Generate and score the prompts of `step` with the adapter the rollout actors hold now."""
        timer = PhaseTimer()
        prompts = sampler.next_batch(config.train.prompts_per_step, step)
        samples = rollouts.generate(prompts)
        timer.lap("generate")
        scored, valid = score(rewards, samples, config, logger, step)
        timer.lap("reward")
        return RolloutBatch(step, samples, [i for i, s in enumerate(samples) if s.reward is not None],
                            scored.metrics(), sum(prompt.truncated for prompt in prompts), timer.phases)

    def train_step(step: int, timer: PhaseTimer) -> tuple[RolloutBatch, dict]:
        """Generate (or take the batch generated ahead), score, learn, publish."""
        if config.algorithm.is_differentiable:
            # GRADE generates inside the learner (it needs gradients through generation);
            # its hard samples are scored below exactly like every other method's.
            prompts = sampler.next_batch(config.train.prompts_per_step, step)
            samples, learner_metrics = learners.grade_step(prompts, step)
            scored, _ = score(rewards, samples, config, logger, step)
            batch = RolloutBatch(step, samples, [i for i, s in enumerate(samples) if s.reward is not None],
                                 scored.metrics(), sum(prompt.truncated for prompt in prompts), {})
            timer.lap("learn")
        else:
            batch = ahead.popleft() if ahead else rollout_batch(step)
            timer.phases.update(batch.phases)
            timer.lap("wait")
            valid = batch.valid_samples
            group_sizes = group_sizes_of(valid, batch.samples, config.rollout.samples_per_prompt)
            training = learners.start_train_step(valid, [s.reward for s in valid], group_sizes)
            # Bounded staleness: while the learner trains step t, the rollouts make the batches of t+1..t+N.
            while len(ahead) < config.rollout.max_staleness and step + 1 + len(ahead) < config.train.steps:
                ahead.append(rollout_batch(step + 1 + len(ahead)))
            timer.lap("rollout_ahead")
            learner_metrics = learners.finish(training)
            check_sync(learner_metrics, config.rollout.sync_tolerance, step)
            timer.lap("learn")
        rollouts.publish(learners.publish())
        timer.lap("publish")
        return batch, learner_metrics

    def restart_learners(error: Exception) -> int:
        """A learner died: start the group again from the last checkpoint; returns the step to redo from."""
        nonlocal learners
        latest = latest_checkpoint(output_dir)
        print(f"[raylign] a learner died ({type(error).__name__}); restarting the learners from {latest}",
              file=sys.stderr, flush=True)
        learners.release()
        learners = LearnerGroup(config, model_path)
        releases.append(learners.release)
        learners.attach_lora()
        evaluator.learner = learners.leader
        state = json.loads((latest / "driver_state.json").read_text())
        next_step, kept = restore_run(latest, output_dir, state, learners, rewards, sampler, probe_sampler, evaluator)
        history[:] = kept
        ahead.clear()
        ahead.extend(RolloutBatch.from_state(batch) for batch in state.get("batches_ahead", []))
        rollouts.publish(learners.publish())
        return next_step

    def restarts() -> dict:
        return {"rollout/restarts": rollouts.restarts, "reward/restarts": rewards.restarts,
                "learner/restarts": learner_restarts}

    def learn_and_log(step: int) -> dict:
        """One training step with its validation and checkpoint, logged; returns its metrics."""
        timer = PhaseTimer()
        if config.train.grad_variance_every and step % config.train.grad_variance_every == 0:
            measure_gradient_variance(config, learners.leader, rollouts, rewards, probe_sampler, step, output_dir)
            timer.lap("grad_variance")
        batch, learner_metrics = train_step(step, timer)
        valid = batch.valid_samples
        learner_seconds = learner_metrics.pop("learn_seconds")
        metrics = {
            "step": step,
            "reward_mean": statistics.fmean(s.reward for s in valid),
            "reward_std": statistics.pstdev(s.reward for s in valid),
            **batch.reward_metrics,
            **learner_metrics,
            "time/learner_compute_s": learner_seconds,
            **restarts(),
            "rollout/staleness": learner_metrics["policy_version"] - 1 - min(s.policy_version for s in batch.samples),
            "data/truncated_prompts": batch.truncated_prompts,
        }
        if evaluator.validation_due(step):
            metrics.update(evaluator.validate(step, rollouts.current_update))
            timer.lap("eval")
        metrics.update({key: value for key, value in timer.metrics().items() if key != "time/wait_s"})
        history.append(metrics)
        logger.log_metrics(metrics)
        logger.log_samples(step, batch.samples, config.logging.samples_per_step)
        if config.train.checkpoint_every and (step + 1) % config.train.checkpoint_every == 0:
            checkpoint(learners, rewards, output_dir, step, sampler, probe_sampler, evaluator, ahead)
        return metrics

    run_start = time.perf_counter()
    step, learner_restarts = first_step, 0
    final_checkpoint, test_metrics = None, None
    bar = ProgressBar(config.logging.progress, config.train.steps, first_step)
    try:
        if config.train.max_learner_restarts and resume is None:
            checkpoint(learners, rewards, output_dir, -1, sampler, probe_sampler, evaluator, ahead)  # step 0's state
        while test_metrics is None:
            try:
                if step < config.train.steps:
                    bar.advance(learn_and_log(step))
                    step += 1
                else:
                    final_checkpoint = checkpoint(learners, rewards, output_dir, config.train.steps - 1, sampler,
                                                  probe_sampler, evaluator, ahead)
                    test_metrics = evaluator.test(rollouts.current_update)
            except ray.exceptions.RayActorError as error:
                # A learner that dies in a step (update, evaluation, checkpoint) or in the final checkpoint or test
                # evaluation: redo from the newest checkpoint (the final one, once written: nothing is retrained).
                if learner_restarts >= config.train.max_learner_restarts or learners.alive():
                    raise
                learner_restarts += 1
                step = restart_learners(error)
                bar.rewind(step)
    finally:
        bar.close()
        logger.close()
    results = summarise(history, time.perf_counter() - run_start, sft_metrics, final_checkpoint, output_dir)
    results["rollout_engine"] = engine.to_dict()
    results["prompts"] = encoder.summary()
    results.update(restarts())  # the run's totals, a restart after the last step included
    results.update(test_metrics)
    results.update(evaluator.best_summary())
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def latest_checkpoint(output_dir: Path) -> Path:
    """The newest output_dir/checkpoints/step_N (step_000000 holds the state before the first step)."""
    checkpoints = sorted((output_dir / "checkpoints").glob("step_*"))
    if not checkpoints:
        raise RuntimeError(f"no checkpoint under {output_dir / 'checkpoints'} to restart the learners from")
    return checkpoints[-1]


def read_resume_state(config: RunConfig, output_dir: Path) -> dict | None:
    if config.train.resume_from is None:
        return None
    state_file = Path(config.train.resume_from) / "driver_state.json"
    if not state_file.is_file():
        raise ValueError(
            f"train.resume_from = '{config.train.resume_from}' holds no driver_state.json; point it at a checkpoint "
            f"directory such as {output_dir / 'checkpoints' / 'step_000010'}"
        )
    return json.loads(state_file.read_text())


def restore_run(checkpoint_dir: str | Path, output_dir: Path, resume: dict, learners: LearnerGroup, rewards: RewardPool,
                sampler: PromptSampler, probe_sampler: PromptSampler, evaluator: Evaluator) -> tuple[int, list[dict]]:
    """Put every actor and the driver back in the checkpoint's state; returns the next step and the history so far."""
    learners.load_checkpoint(str(checkpoint_dir))
    rewards.load_state_dict(resume["reward_normalizer"])
    sampler.restore(PromptCursor(**resume["prompt_cursor"]))
    probe_sampler.restore(PromptCursor(**resume["probe_cursor"]))
    evaluator.restore_best(resume.get("best_val_reward"), resume.get("best_val_step"))
    next_step = resume["step"] + 1
    # Steps logged after the checkpoint by the interrupted run are dropped: they are about to be redone.
    metrics_file = output_dir / "metrics.jsonl"
    history = [m for m in map(json.loads, metrics_file.read_text().splitlines()) if m["step"] < next_step] if metrics_file.is_file() else []
    metrics_file.write_text("".join(json.dumps(m) + "\n" for m in history))
    return next_step, history


def score(rewards: RewardPool, samples: list[Sample], config: RunConfig, logger: RunLogger, step: int):
    """Score samples; invalid ones are logged to reward_errors.jsonl and left out of the update."""
    scored = rewards.score_batch(samples)
    for sample, value in zip(samples, scored.rewards, strict=True):
        sample.reward = value
    logger.log_reward_errors(step, scored.errors)
    check_invalid_fraction(scored, config.reward.max_invalid_fraction, step)
    return scored, [s for s in samples if s.reward is not None]


@dataclass
class RolloutBatch:
    """One step's prompts, generated and scored: what the learner trains on, possibly some steps later."""

    step: int
    samples: list[Sample]
    valid: list[int]  # indices of the samples with a reward (the rest were invalid, logged and left out)
    reward_metrics: dict
    truncated_prompts: int
    phases: dict[str, float]

    @property
    def valid_samples(self) -> list[Sample]:
        return [self.samples[i] for i in self.valid]

    def to_state(self) -> dict:
        return {**asdict(self), "samples": [asdict(s) for s in self.samples]}

    @classmethod
    def from_state(cls, state: dict) -> "RolloutBatch":
        return cls(**{**state, "samples": [Sample(**s) for s in state["samples"]]})


class PhaseTimer:
    """Wall time of each phase of a step, reported as time/<phase>_s plus time/step_s."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        return {**{f"time/{k}_s": v for k, v in self.phases.items()}, "time/step_s": time.perf_counter() - self.start}


def group_sizes_of(valid: list[Sample], samples: list[Sample], group_size: int) -> list[int]:
    """Sizes of the prompt groups after invalid samples were removed, in order (groups are contiguous)."""
    position = {id(s): i for i, s in enumerate(samples)}
    sizes: dict[int, int] = {}
    for sample in valid:
        group = position[id(sample)] // group_size
        sizes[group] = sizes.get(group, 0) + 1
    return list(sizes.values())


def may_share_a_gpu(config: RunConfig) -> bool:
    """Whether a rollout actor and a learner can land on one GPU (both ask for a fraction of one)."""
    return 0 < config.rollout.num_gpus < 1 and 0 < config.train.num_gpus < 1


def resolve_model_path(config: RunConfig, output_dir: Path) -> str:
    """Build a built-in tiny model into the run directory; other paths pass through."""
    return resolve_builtin_model(config.model.path, output_dir / "base_model", config.seed)


@contextmanager
def user_errors():
    """Checks of what the user gave (model, data, config against both) raise ValueError naming field, value
    and fix; at start-up they become ConfigError, which the CLI reports as one message with exit status 2."""
    try:
        yield
    except ValueError as error:
        raise ConfigError(str(error)) from None


def prepare_run(config: RunConfig, model_path: str) -> tuple[RunConfig, EnginePlan]:
    """Start-up checks of the model against the config, and the rollout engine it gets (logged by `read_inputs`,
    recorded in results.json): the config with rollout.backend and rollout.weight_sync decided, and the plan."""
    with user_errors():
        check_has_tokenizer(model_path, "model.path")
        check_lora_targets(model_path, config.model.lora.target_modules, "model.lora.target_modules")
        plan = engine_plan(config.rollout.backend, config.rollout.weight_sync, hub_model_architecture(model_path))
    rollout = config.rollout.model_copy(update={"backend": plan.backend, "weight_sync": plan.weight_sync})
    return config.model_copy(update={"rollout": rollout}), plan


def warm_start(config: RunConfig, learners: LearnerGroup, output_dir: Path) -> tuple[str, dict]:
    """Full-parameter SFT on the learner; the result becomes the base model for RL."""
    texts = load_text_column(config.sft.data, config.sft.text_field, data_dir=output_dir / "data")
    sft_dir = str(output_dir / "sft_model")
    return sft_dir, learners.warm_start(texts, config.sft, sft_dir)


def make_prompt_sampler(config: RunConfig, encoder: PromptEncoder, output_dir: Path, seed: int | None = None) -> PromptSampler:
    """The training prompts (data.split), fitted to the prompt budget, in a seeded order."""
    texts = load_text_column(config.data.prompts, config.data.prompt_field, config.data.split, data_dir=output_dir / "data")
    if config.data.max_prompts is not None:
        texts = texts[: config.data.max_prompts]
    fitted = encoder.encode(texts, config.data.split)
    extras = None
    if config.data.extra_fields:
        columns = load_columns(config.data.prompts, config.data.extra_fields, config.data.split, data_dir=output_dir / "data")
        extras = [{name: values[i] for name, values in columns.items()} for i in fitted.kept]
    return PromptSampler([texts[i] for i in fitted.kept], fitted.token_ids, config.seed if seed is None else seed, extras,
                         fitted.truncated)


def measure_gradient_variance(config: RunConfig, learner, rollouts: RolloutPool, rewards: RewardPool,
                              probe_sampler: PromptSampler, step: int, output_dir: Path) -> dict:
    """Gradients of B independent batches at the current weights -> gradient_variance.jsonl.

    Policy-gradient batches are sampled by the rollout actors and scored with
    raw (unnormalised) rewards; GRADE batches are prompts the learner relaxes.
    """
    batches = []
    for _ in range(config.train.grad_variance_batches):
        prompts = probe_sampler.next_batch(config.train.prompts_per_step, step)
        if config.algorithm.is_differentiable:
            batches.append(prompts)
            continue
        samples = rollouts.generate(prompts)
        scored = rewards.score_batch(samples, normalize=False)
        for sample, value in zip(samples, scored.raw_rewards or scored.rewards, strict=True):
            sample.reward = value
        valid = [s for s in samples if s.reward is not None]
        batches.append((valid, [s.reward for s in valid], group_sizes_of(valid, samples, config.rollout.samples_per_prompt)))
    result = ray.get(learner.gradient_variance.remote(batches, step))
    with (output_dir / "gradient_variance.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def check_sync(learner_metrics: dict, tolerance: float, step: int) -> None:
    """Stop when behaviour logprobs disagree with the learner's on the same tokens."""
    gap = learner_metrics["rollout/logprob_gap"]
    # NaN compares false with everything: an engine left with uninitialised weights must not pass.
    if not math.isfinite(gap) or gap > tolerance:
        raise SyncError(
            f"step {step}: mean |behaviour - learner| logprob gap is {gap:.3g} (> rollout.sync_tolerance = {tolerance:g}). "
            "The rollout actors are not sampling from the adapter the learner published (a silent weight-sync failure), "
            "or the engines score tokens differently (dtype, truncation). Check the adapter broadcast; raise "
            "rollout.sync_tolerance only if the engines legitimately differ (e.g. bf16)."
        )


def checkpoint(learners: LearnerGroup, rewards: RewardPool, output_dir: Path, step: int, sampler: PromptSampler,
               probe_sampler: PromptSampler, evaluator: Evaluator, ahead: deque | tuple = ()) -> str:
    """Everything a resumed run needs, the batches already generated ahead included; the learner writes its
    own state beside the driver's."""
    state = {"step": step, "prompt_cursor": asdict(sampler.cursor), "probe_cursor": asdict(probe_sampler.cursor),
             "reward_normalizer": rewards.state_dict(), "batches_ahead": [batch.to_state() for batch in ahead],
             **evaluator.best_summary()}
    return learners.save_checkpoint(str(output_dir / "checkpoints" / f"step_{step + 1:06d}"), state)


def summarise(history: list[dict], wall_seconds: float, sft_metrics: dict, final_checkpoint: str, output_dir: Path) -> dict:
    window = max(1, len(history) // 10)
    timing_keys = sorted({k for m in history for k in m if k.startswith("time/")})
    return {
        "output_dir": str(output_dir),
        "steps": len(history),
        "reward_first_10pct": statistics.fmean(m["reward_mean"] for m in history[:window]),
        "reward_last_10pct": statistics.fmean(m["reward_mean"] for m in history[-window:]),
        # Sample efficiency: first step whose smoothed reward covers 80 % of the run's rise.
        "steps_to_80pct": steps_to_threshold([m["step"] for m in history], [m["reward_mean"] for m in history], 0.8),
        "kl_last": history[-1].get("kl"),  # absent when no KL term was on (no reference pass)
        "logprob_gap_max": max((m["rollout/logprob_gap"] for m in history if "rollout/logprob_gap" in m), default=None),
        "mean_timings": {k: statistics.fmean(m[k] for m in history if k in m) for k in timing_keys},
        "wall_seconds": wall_seconds,
        "final_checkpoint": final_checkpoint,
        **sft_metrics,
    }


class ProgressBar:
    """A progress bar over the steps showing the latest reward, KL and logprob gap (nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True) if enabled else None

    def advance(self, last: dict) -> None:
        if self.bar is None:
            return
        postfix = {"reward": f"{last['reward_mean']:.3f}"}
        if "kl" in last:
            postfix["kl"] = f"{last['kl']:.4f}"
        if "rollout/logprob_gap" in last:
            postfix["gap"] = f"{last['rollout/logprob_gap']:.1e}"
        self.bar.set_postfix(postfix)
        self.bar.update(1)

    def rewind(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
