"""The reward actor: scores batches of samples with weighted reward sources.

`score_batch` never raises for a bad reward: a source that raises marks the
samples of that call invalid, a non-finite (or None, or non-numeric) score
marks its sample invalid, and the `RewardResult` says which and why. The
driver leaves invalid samples out of the update, logs them, and stops the run
when there are too many (`check_invalid_fraction`).
"""

from __future__ import annotations

import math
import time
import traceback

from raylign.actors.rewards import RewardSource, RunningNormalizer, build_source
from raylign.common.config import RewardConfig, RunStopped
from raylign.common.types import RewardResult, Sample

WORKER_SOURCE = "reward_worker"


class RewardError(RunStopped):
    """A reward function failed or returned something unusable; the message says which sample and why."""


class RewardWorker:
    """Runs as a Ray actor; resolves its functions and loads its reward models once.

    `config` is a `RewardConfig`, or a reward function name for a single
    function with default settings.
    """

    def __init__(self, config: RewardConfig | str, device: str | None = None):
        if isinstance(config, str):
            config = RewardConfig(function=config)
        self.config = config
        sources = config.resolved_sources()
        self.device = device or "cpu"
        if any(source.is_reward_model for source in sources):
            import torch

            torch.set_num_threads(config.threads or 1)
            if device is None and config.num_gpus > 0 and torch.cuda.is_available():
                self.device = "cuda"
        self.sources: list[RewardSource] = [
            build_source(source, self.device, config.batch_size, field, name_field)
            for source, (field, name_field) in zip(sources, source_locations(config))
        ]
        self.normalizer = RunningNormalizer(config.ema_momentum) if config.normalize == "running" else None
        # Ray re-runs __init__ when it restarts this actor; the next result says so, once (reward/restarts).
        self.unreported_restart = restarted_by_ray()

    def score(self, samples: list[Sample]) -> list[float]:
        """Rewards for all samples, or `RewardError` naming the first invalid sample and its cause."""
        result = self.score_batch(samples)
        if result.errors:
            raise RewardError(describe_invalid(result))
        return result.rewards

    def score_batch(self, samples: list[Sample], normalize: bool = True,
                    normalizer_state: dict | None = None) -> RewardResult:
        """Score every source on every sample; invalid samples get reward None and an entry in `errors`.

        `normalize=False` returns the weighted totals unnormalised, for a pool
        that normalises the joined shares of several actors with `normalize`.
        `normalizer_state`, when given, replaces the running statistics first, so
        a caller that keeps the state can use (restarted) actors as stateless.
        """
        try:
            result = self._score(samples)
        except Exception as exc:  # a failure outside any source must not kill the run either
            result = _all_invalid(samples, [source.label for source in self.sources], WORKER_SOURCE, exc)
        self._report_restart(result)
        return self.normalize(result, normalizer_state) if normalize else result

    def normalize(self, result: RewardResult, normalizer_state: dict | None = None) -> RewardResult:
        """Apply the running normalisation (normalize: running) to `raw_rewards`; a no-op for 'none'."""
        self._report_restart(result)
        if self.normalizer is None:
            result.rewards = list(result.raw_rewards)
            return result
        if normalizer_state is not None:
            self.normalizer.load_state_dict(normalizer_state)
        result.rewards = self.normalizer(result.raw_rewards)
        result.stats["reward/running_mean"] = self.normalizer.mean
        result.stats["reward/running_std"] = self.normalizer.std
        result.normalizer_state = self.normalizer.state_dict()
        return result

    def _report_restart(self, result: RewardResult) -> None:
        result.restarts += self.unreported_restart
        self.unreported_restart = False

    def normalizer_state(self) -> dict | None:
        """The running statistics, for checkpoints (None when normalisation is off)."""
        return None if self.normalizer is None else self.normalizer.state_dict()

    def _score(self, samples: list[Sample]) -> RewardResult:
        count = len(samples)
        prompts = [s.prompt for s in samples]
        completions = [s.completion for s in samples]
        extra = _extra_columns(samples)
        batch_size = self.config.batch_size
        result = RewardResult(rewards=[None] * count)
        for source in self.sources:
            values: list[float | None] = [None] * count
            start = time.perf_counter()
            for low in range(0, count, batch_size):
                high = min(low + batch_size, count)
                try:
                    scores = source.score(prompts[low:high], completions[low:high], {k: v[low:high] for k, v in extra.items()})
                except Exception as exc:  # the samples become invalid, with the exception as cause
                    result.errors.extend(_exception_entry(i, samples[i], source.label, exc) for i in range(low, high))
                    continue
                if len(scores) != high - low:
                    message = f"returned {len(scores)} scores for {high - low} samples; return one float per sample"
                    result.errors.extend(_entry(i, samples[i], source.label, message) for i in range(low, high))
                    continue
                for index, value in zip(range(low, high), scores):
                    number = _finite_float(value)
                    if number is None:
                        result.errors.append(_entry(index, samples[index], source.label, f"returned a non-finite score ({value!r})"))
                    values[index] = number
            result.components[source.label] = values
            result.stats[f"time/reward_{source.label}_s"] = time.perf_counter() - start
        result.raw_rewards = [self._total(i, result.components) for i in range(count)]
        return result

    def _total(self, index: int, components: dict[str, list[float | None]]) -> float | None:
        values = [components[source.label][index] for source in self.sources]
        if any(value is None for value in values):
            return None
        return math.fsum(source.weight * value for source, value in zip(self.sources, values))


def source_locations(config: RewardConfig) -> list[tuple[str, str | None]]:
    """Where each of `resolved_sources()` sits in the config, for messages: (its field, the field of its name)."""
    if config.sources:
        return [(f"reward.sources[{i}]", None) for i in range(len(config.sources))]
    return [("reward", "reward.function")]


def restarted_by_ray() -> bool:
    """Whether this process is a Ray actor that Ray has restarted (False outside an actor)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False
    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def check_invalid_fraction(result: RewardResult, max_invalid_fraction: float, step: int) -> None:
    """Raise `RewardError` with the cause when more than `max_invalid_fraction` of the samples are invalid."""
    if result.invalid_fraction > max_invalid_fraction:
        raise RewardError(
            f"step {step}: {describe_invalid(result)}; that is more than reward.max_invalid_fraction = "
            f"{max_invalid_fraction:g}. Fix the reward (the errors are in reward_errors.jsonl), or raise "
            "reward.max_invalid_fraction to tolerate more"
        )


def describe_invalid(result: RewardResult) -> str:
    """'k of n samples have no valid reward; first: ...' naming the source, the completion and the cause."""
    first = result.errors[0]
    return (
        f"{result.invalid_count} of {len(result.rewards)} samples have no valid reward; first: sample {first['index']}, "
        f"source '{first['source']}': {first['error']} (completion {first['completion']!r})"
    )


def _extra_columns(samples: list[Sample]) -> dict[str, list]:
    keys = dict.fromkeys(key for sample in samples for key in sample.extra)
    return {key: [sample.extra.get(key) for sample in samples] for key in keys}


def _finite_float(value: object) -> float | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _entry(index: int, sample: Sample, source: str, error: str) -> dict:
    return {
        "index": index, "prompt_index": sample.prompt_index, "sample_index": sample.sample_index,
        "policy_version": sample.policy_version, "prompt": sample.prompt, "completion": sample.completion,
        "source": source, "error": error,
    }


def _exception_entry(index: int, sample: Sample, source: str, exc: BaseException) -> dict:
    entry = _entry(index, sample, source, f"{type(exc).__name__}: {exc}")
    entry["traceback"] = "".join(traceback.format_exception(exc))
    return entry


def _all_invalid(samples: list[Sample], labels: list[str], source: str, exc: BaseException) -> RewardResult:
    count = len(samples)
    return RewardResult(
        rewards=[None] * count,
        components={label: [None] * count for label in labels},
        errors=[_exception_entry(i, sample, source, exc) for i, sample in enumerate(samples)],
        raw_rewards=[None] * count,
    )
