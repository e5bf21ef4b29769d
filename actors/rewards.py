"""Reward functions the reward actor can call by name.

A reward function takes `prompts` and `completions` (lists of str, same
length) plus any extra dataset columns as keyword arguments, and returns one
float per sample.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

RewardFunction = Callable[..., list[float]]


def vader_sentiment(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """VADER compound sentiment of the completion, in [-1, 1] (positive = higher)."""
    analyzer = _vader_analyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in completions]


@functools.cache
def _vader_analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@functools.cache
def _default_heuristic():
    from raylign.actors.heuristic_reward import HeuristicReward, HeuristicRewardConfig

    return HeuristicReward(HeuristicRewardConfig())


def heuristic_reply(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """Weighted heuristic reply quality (see `heuristic_reward.py`), default weights."""
    return _default_heuristic().score(prompts, completions)


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "vader_sentiment": vader_sentiment,
    "heuristic_reply": heuristic_reply,
}


def resolve_reward_function(name: str) -> RewardFunction:
    """A registered name, or 'module.path:function' for a user function."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        module_name, function_name = name.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"reward.function = '{name}': cannot import module '{module_name}' ({exc}); check the module path") from exc
        function = getattr(module, function_name, None)
        if not callable(function):
            raise ValueError(f"reward.function = '{name}': '{module_name}' has no callable '{function_name}'")
        return function
    known = ", ".join(sorted(REWARD_FUNCTIONS))
    raise ValueError(f"reward.function = '{name}' is unknown; use one of {known} or 'module.path:function'")
