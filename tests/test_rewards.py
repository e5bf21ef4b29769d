import math

import pytest

from raylign.actors.reward_worker import RewardError, RewardWorker
from raylign.actors.rewards import resolve_reward_function, vader_sentiment
from raylign.common.types import Sample


def make_samples(completions):
    return [Sample(prompt_index=i, sample_index=0, prompt="The movie was", prompt_ids=[1], completion=c,
                   completion_ids=[2], behaviour_logprobs=[0.0], policy_version=0, finish_reason="stop")
            for i, c in enumerate(completions)]


def test_vader_scores_positive_reviews_above_negative_ones():
    good, neutral, bad = vader_sentiment(["", "", ""], [" great and wonderful.", " long.", " awful and boring."])
    assert good > 0.5 > neutral == 0.0 > -0.5 > bad


def user_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def nan_reward(prompts, completions):
    return [math.nan for _ in completions]


def test_user_function_by_module_path_is_called_with_prompts_and_completions():
    worker = RewardWorker("tests.test_rewards:user_reward")
    assert worker.score(make_samples(["ab", "abcd"])) == [2.0, 4.0]


def test_unknown_reward_names_the_field_and_choices():
    with pytest.raises(ValueError, match=r"reward\.function = 'nope' is unknown; use one of .*vader_sentiment"):
        resolve_reward_function("nope")


def test_non_finite_reward_stops_score_with_the_source_and_offending_completion():
    with pytest.raises(RewardError, match=r"2 of 2 samples have no valid reward; first: sample 0, source 'nan_reward': returned a non-finite score \(nan\) \(completion 'x'\)"):
        RewardWorker("tests.test_rewards:nan_reward").score(make_samples(["x", "y"]))
