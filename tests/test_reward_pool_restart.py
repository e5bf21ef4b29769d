"""A crashed reward actor is restarted, gets its running statistics back, and the batch is scored again."""

import pytest
import ray

from raylign.cluster.reward_pool import RewardPool
from raylign.common.config import RewardConfig
from raylign.common.types import Sample


def batch(words):
    return [Sample(prompt_index=i, sample_index=0, prompt="The movie was", prompt_ids=[1], completion=f" {w}.",
                   completion_ids=[2], behaviour_logprobs=[0.0], policy_version=0, finish_reason="stop")
            for i, w in enumerate(words)]


@pytest.mark.slow
def test_crashed_reward_actor_is_restarted_with_its_running_statistics(ray_session):
    config = RewardConfig(function="vader_sentiment", normalize="running")
    first, second = batch(["great", "awful", "fine", "boring"]), batch(["wonderful", "bad", "good", "dull"])
    steady = RewardPool(config)
    steady.score_batch(first)
    expected = steady.score_batch(second)

    crashing = RewardPool(config)
    crashing.score_batch(first)
    ray.kill(crashing.workers[0], no_restart=False)
    got = crashing.score_batch(second)
    assert crashing.restarts <= 1  # the call either fails and is retried, or reaches the restarted actor
    assert got.rewards == expected.rewards  # normalised with the statistics from before the crash
    assert got.normalizer_state == expected.normalizer_state
    for worker in steady.workers + crashing.workers:
        ray.kill(worker)
