"""Reward functions, reward sources and the running reward normaliser.

A reward function has the signature

    fn(prompts: list[str], completions: list[str], **extra) -> list[float]

`prompts` and `completions` have one entry per sample (a prompt repeats for
each of its K samples); `extra` holds the dataset's other columns, one list per
column aligned with the samples (a function receives only the columns it
names, or all of them if it takes `**kwargs`), plus the source's `options`.
It returns one float per sample, may be `async`, and may return None, NaN or
inf for a sample it cannot score: that sample becomes invalid instead of
stopping the run.

A reward *source* is a function or a reward model with a weight and a label
(see `RewardSourceConfig`); the reward actor adds the weighted scores of its
sources and logs each one separately.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

from raylign.common.config import RewardSourceConfig

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


def _heuristic_reply_with(options: dict[str, Any]) -> RewardFunction:
    """heuristic_reply with `options` as HeuristicRewardConfig fields (weights, min_chars, ...)."""
    from raylign.actors.heuristic_reward import HeuristicReward, HeuristicRewardConfig

    scorer = HeuristicReward(HeuristicRewardConfig(**options))
    return lambda prompts, completions, **_: scorer.score(prompts, completions)


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "vader_sentiment": vader_sentiment,
    "heuristic_reply": heuristic_reply,
}

# Registered functions whose `options` configure the scorer instead of being passed per call.
CONFIGURABLE_FUNCTIONS: dict[str, Callable[[dict[str, Any]], RewardFunction]] = {
    "heuristic_reply": _heuristic_reply_with,
}


def resolve_reward_function(name: str, field: str = "reward.function") -> RewardFunction:
    """A registered name, or 'module.path:function' for a user function."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        module_name, function_name = name.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # an ImportError, or whatever the module's own code raised while it was imported
            raise ValueError(f"{field} = '{name}': cannot import module '{module_name}' ({type(exc).__name__}: {exc}); "
                             "check the module path (importable from the working directory or PYTHONPATH) and the module") from exc
        function = getattr(module, function_name, None)
        if not callable(function):
            raise ValueError(f"{field} = '{name}': '{module_name}' has no callable '{function_name}'")
        return function
    known = ", ".join(sorted(REWARD_FUNCTIONS))
    raise ValueError(f"{field} = '{name}' is unknown; use one of {known} or 'module.path:function'")


@dataclass
class RewardSource:
    """One weighted scorer. `score(prompts, completions, extra)` returns one raw value per sample."""

    label: str
    weight: float
    score: Callable[[list[str], list[str], dict[str, list]], list[Any]]


def build_source(
    config: RewardSourceConfig, device: str = "cpu", batch_size: int = 64, field: str | None = None, name_field: str | None = None
) -> RewardSource:
    """Resolve a function or load a reward model (once) for one configured source.

    Errors name `field` (where the source sits in the config, e.g. 'reward.sources[1]')
    and `name_field` (where its name sits, e.g. 'reward.function').
    """
    field = field or f"reward.sources[name={config.name!r}]"
    name_field = name_field or f"{field}.name"
    if config.is_reward_model:
        return RewardSource(config.display_name, config.weight, _model_scorer(config, device, batch_size, field))
    return RewardSource(config.display_name, config.weight, _function_scorer(config, field, name_field))


def _function_scorer(
    config: RewardSourceConfig, field: str, name_field: str
) -> Callable[[list[str], list[str], dict[str, list]], list[Any]]:
    if config.options and config.name in CONFIGURABLE_FUNCTIONS:
        try:
            function, options = CONFIGURABLE_FUNCTIONS[config.name](config.options), {}
        except ValueError as exc:
            raise ValueError(f"{field}.options = {config.options}: {exc}") from exc
    elif config.options and config.name in REWARD_FUNCTIONS:
        raise ValueError(f"{field}.options = {config.options}: '{config.name}' takes no options; remove them")
    else:
        function, options = resolve_reward_function(config.name, field=name_field), dict(config.options)
    signature = _signature(function)
    if signature is not None:
        try:
            signature.bind_partial([], [], **options)
        except TypeError as exc:
            raise ValueError(
                f"{field}.options = {options}: {config.name} does not accept them ({exc}); remove them or add the "
                "parameters to the function"
            ) from exc
    accepts = _accepted_columns(signature)

    def score(prompts: list[str], completions: list[str], extra: dict[str, list]) -> list[Any]:
        columns = {key: values for key, values in extra.items() if accepts is None or key in accepts}
        return call_reward_function(function, prompts, completions, **{**columns, **options})

    return score


def _signature(function: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def _accepted_columns(signature: inspect.Signature | None) -> set[str] | None:
    """Names of extra columns the function takes; None means all of them (it has **kwargs or no signature)."""
    if signature is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {name for name, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def call_reward_function(function: RewardFunction, prompts: list[str], completions: list[str], **kwargs: Any) -> list[Any]:
    """Call a sync or async reward function and return its scores as a list."""
    result = function(prompts, completions, **kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(_wait_for(result))
    return list(result)


async def _wait_for(awaitable):
    return await awaitable


def _model_scorer(
    config: RewardSourceConfig, device: str, batch_size: int, field: str
) -> Callable[[list[str], list[str], dict[str, list]], list[Any]]:
    from raylign.common.reward_models import load_reward_model

    options = config.options
    try:
        model = load_reward_model(
            config.path, kind=config.name.removesuffix("_rm"), adapter=options.get("adapter"),
            dtype=options.get("dtype"), max_length=options.get("max_length"),
        )
    except (ValueError, OSError) as exc:
        raise ValueError(f"{field}.path = '{config.path}': {exc}") from exc
    model.to(device)
    template = options.get("template")
    if template is None and model.kind != "classifier":
        # Pairwise reward models score what their training saw: prompt, completion, EOS.
        chat_template = options.get("chat_template")

        def score_pairs(prompts: list[str], completions: list[str], extra: dict[str, list]) -> list[Any]:
            return model.score_prompt_completions(prompts, completions, batch_size=batch_size, chat_template=chat_template)

        return score_pairs
    template = template or "{prompt}{completion}"

    def score(prompts: list[str], completions: list[str], extra: dict[str, list]) -> list[Any]:
        texts = [template.format(prompt=p, completion=c) for p, c in zip(prompts, completions, strict=True)]
        return model.score_texts(texts, batch_size=batch_size)

    return score


class RunningNormalizer:
    """Running mean and variance of the total reward, as exponential moving averages over steps.

    Each call first folds the batch's valid values into the statistics, then
    returns (value - mean) / sqrt(var + eps). The first batch sets mean and var
    to its own; after that, with momentum m, batch mean b and batch variance v:

        mean' = m * mean + (1 - m) * b
        var'  = m * var + (1 - m) * v + m * (1 - m) * (b - mean)^2

    (the variance of the mixture of the past, weight m, and the batch, weight 1 - m).
    Invalid samples (None) stay None and do not move the statistics.
    """

    def __init__(self, momentum: float, eps: float = 1e-8):
        self.momentum = momentum
        self.eps = eps
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    def update(self, values: list[float]) -> None:
        if not values:
            return
        batch_mean = math.fsum(values) / len(values)
        batch_var = math.fsum((v - batch_mean) ** 2 for v in values) / len(values)
        if self.count == 0:
            self.mean, self.var = batch_mean, batch_var
        else:
            m = self.momentum
            delta = batch_mean - self.mean
            self.mean = m * self.mean + (1 - m) * batch_mean
            self.var = m * self.var + (1 - m) * batch_var + m * (1 - m) * delta**2
        self.count += len(values)

    def __call__(self, values: list[float | None]) -> list[float | None]:
        self.update([v for v in values if v is not None])
        std = math.sqrt(self.var + self.eps)
        return [None if v is None else (v - self.mean) / std for v in values]

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
