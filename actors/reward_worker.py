"""The reward actor: scores batches of samples with one reward function."""

from __future__ import annotations

import inspect
import math

from raylign.actors.rewards import resolve_reward_function
from raylign.common.types import Sample


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message says which sample and why."""


class RewardWorker:
    """Runs as a Ray actor; loads its reward function once."""

    def __init__(self, function: str):
        self.name = function
        self.function = resolve_reward_function(function)

    def score(self, samples: list[Sample]) -> list[float]:
        prompts = [s.prompt for s in samples]
        completions = [s.completion for s in samples]
        result = self.function(prompts, completions)
        if inspect.isawaitable(result):
            import asyncio

            result = asyncio.run(result)
        rewards = [float(r) for r in result]
        if len(rewards) != len(samples):
            raise RewardError(f"reward function '{self.name}' returned {len(rewards)} scores for {len(samples)} samples")
        bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        if bad:
            first = samples[bad[0]]
            raise RewardError(
                f"reward function '{self.name}' returned a non-finite score for {len(bad)} samples, "
                f"first: {rewards[bad[0]]} for completion {first.completion!r}"
            )
        return rewards
