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


def distance_to_target_length(prompts, completions, target_length):
    return [-abs(len(c.split()) - t) for c, t in zip(completions, target_length)]


def test_dataset_columns_reach_user_reward_functions(warm_model_dir, tmp_path):
    """data.extra_fields -> PromptItem.extra -> Sample.extra -> the reward function's keyword arguments."""
    import json

    from raylign.actors.rollout_worker import RolloutWorker
    from raylign.cluster.driver import make_prompt_sampler
    from raylign.cluster.prompts import PromptEncoder
    from raylign.common.config import load_config
    from raylign.common.types import SamplingSettings

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Review {i}: the movie was", "target_length": i}) + "\n" for i in range(4)))
    config = load_config("configs/quickstart.yaml", [f"model.path={warm_model_dir}", f"data.prompts={prompts}",
                                                      "data.extra_fields=[target_length]"])
    batch = make_prompt_sampler(config, PromptEncoder(config, warm_model_dir), tmp_path).next_batch(4, step=0)
    assert sorted(p.extra["target_length"] for p in batch) == [0, 1, 2, 3]
    rollout = RolloutWorker("hf", warm_model_dir)
    rollout.policy_version = 0
    samples = rollout.generate(batch, SamplingSettings(samples_per_prompt=2, max_new_tokens=8))
    rewards = RewardWorker("tests.test_rewards:distance_to_target_length").score(samples)
    assert rewards == [-abs(len(s.completion.split()) - s.extra["target_length"]) for s in samples]
