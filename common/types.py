"""Data that crosses actor boundaries: prompts, samples, adapter updates.

Plain dataclasses of Python lists so Ray serialises them cheaply and every
actor can read them without importing another actor's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptItem:
    """One prompt to sample K completions for; `seed` makes its samples reproducible."""

    index: int
    text: str
    token_ids: list[int]
    seed: int
    extra: dict = field(default_factory=dict)  # dataset columns passed on to reward functions
    truncated: bool = False  # cut to the prompt budget (data.prompt_overflow = truncate_left)


@dataclass(frozen=True)
class SamplingSettings:
    samples_per_prompt: int
    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


@dataclass
class Completion:
    """What an engine returns for one sampled completion."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class Sample:
    """One scored-or-to-be-scored completion, tagged with the policy version that produced it."""

    prompt_index: int
    sample_index: int
    prompt: str
    prompt_ids: list[int]
    completion: str
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    policy_version: int
    finish_reason: str
    reward: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterUpdate:
    """A LoRA adapter version in PEFT's on-disk format (file name -> bytes).

    Published once to the object store; every rollout actor reads the same copy.
    """

    version: int
    files: dict[str, bytes]


@dataclass
class RewardResult:
    """The reward actor's answer for a batch: rewards, the per-source breakdown, and what failed.

    `rewards[i]` is None when sample i is invalid (a source raised for it or gave a
    non-finite score); `errors` then holds one entry for it per failing source with
    keys `index`, `prompt`, `completion`, `source`, `error` (and `traceback` when an
    exception was raised). `components[label][i]` is source `label`'s raw score
    (before weighting and normalisation). `raw_rewards` is the weighted sum before
    normalisation; `stats` holds the normaliser's state and per-source timings.
    """

    rewards: list[float | None]
    components: dict[str, list[float | None]] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    raw_rewards: list[float | None] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    normalizer_state: dict | None = None  # running statistics after this batch (normalize: running)
    restarts: int = 0  # reward actors Ray restarted since their previous result, each reported once

    @property
    def invalid_indices(self) -> list[int]:
        return [i for i, reward in enumerate(self.rewards) if reward is None]

    @property
    def invalid_count(self) -> int:
        return sum(reward is None for reward in self.rewards)

    @property
    def invalid_fraction(self) -> float:
        return self.invalid_count / len(self.rewards) if self.rewards else 0.0

    def metrics(self) -> dict[str, float]:
        """Per-step metrics: `reward/invalid_count`, `reward/invalid_fraction`, `reward/<source>` means over valid scores, stats."""
        metrics: dict[str, float] = {
            "reward/invalid_count": float(self.invalid_count),
            "reward/invalid_fraction": self.invalid_fraction,
        }
        for label, values in self.components.items():
            valid = [v for v in values if v is not None]
            if valid:
                metrics[f"reward/{label}"] = sum(valid) / len(valid)
        raw = [v for v in self.raw_rewards if v is not None]
        if raw:
            metrics["reward/raw_mean"] = sum(raw) / len(raw)
        metrics.update(self.stats)
        return metrics

    @staticmethod
    def concat(parts: list["RewardResult"]) -> "RewardResult":
        """Join results for consecutive shares of one batch; error indices shift to the joined batch."""
        merged = RewardResult(rewards=[])
        labels = [label for part in parts for label in part.components]
        merged.components = {label: [] for label in dict.fromkeys(labels)}
        for part in parts:
            offset = len(merged.rewards)
            merged.errors.extend({**error, "index": error["index"] + offset} for error in part.errors)
            for label in merged.components:
                merged.components[label].extend(part.components.get(label, [None] * len(part.rewards)))
            merged.rewards.extend(part.rewards)
            merged.raw_rewards.extend(part.raw_rewards)
            merged.restarts += part.restarts
            for key, value in part.stats.items():
                if key.startswith("time/"):
                    merged.stats[key] = max(merged.stats.get(key, 0.0), value)
        return merged
