"""A data-parallel learner group gives the update of one learner: 2 ranks vs 1 on the same batch."""

from __future__ import annotations

import uuid

import pytest
import ray
import torch

from raylign.common.config import load_config
from raylign.common.lora import adapter_state_dict
from raylign.learner.learner_worker import LearnerWorker
from tests.test_composed_update import COMPLETION_LENGTHS, K, REWARDS, fixed_samples


def start_learners(model_dir: str, counts: tuple[int, ...], overrides: list[str]) -> list[list]:
    """One learner group per count, all started at once (each actor spends seconds importing its libraries)."""
    config = load_config("configs/quickstart.yaml", [f"model.path={model_dir}", "rollout.backend=hf",
                                                      f"rollout.samples_per_prompt={K}", "train.prompts_per_step=3",
                                                      "rollout.max_new_tokens=9", *overrides])
    actor = ray.remote(LearnerWorker).options(num_cpus=1)
    groups = [[actor.remote(model_dir, config.model, config.train, config.algorithm, config.rollout, 0)
               for _ in range(count)] for count in counts]
    for learners in groups:
        name = f"test-{uuid.uuid4().hex[:8]}"
        ray.get([learner.join_learner_group.remote(rank, len(learners), name) for rank, learner in enumerate(learners)])
    ray.get([learner.attach_lora.remote() for learners in groups for learner in learners])
    return groups


def two_steps(learners, batch) -> tuple[list[dict], dict]:
    metrics = []
    for _ in range(2):
        for sample in batch:
            sample.policy_version = len(metrics)
        metrics.append(ray.get([learner.train_step.remote(batch, REWARDS) for learner in learners]))
    adapters = [adapter_state_dict(update.files) for update in ray.get([l.publish.remote() for l in learners])]
    return metrics, adapters


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["algorithm.name=grpo", "train.micro_batch_size=4"],
    ["algorithm.name=ppo", "algorithm.num_minibatches=2", "algorithm.epochs=2", "train.micro_batch_size=3"],
    ["algorithm.name=reinforce", "algorithm.loss_aggregation=seq_mean_token_mean"],
], ids=["grpo", "ppo-minibatches", "reinforce"])
def test_two_learners_make_the_update_of_one(ray_session, tiny_model_dir, overrides):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = fixed_samples([tokenizer(p).input_ids for p in ["the movie was", "I watched this and the plot", "Overall"]])
    assert len(batch) == len(COMPLETION_LENGTHS)
    # Random first steps move the adapter, so the second step differentiates a policy that differs from the reference.
    single, pair = start_learners(tiny_model_dir, (1, 2), overrides)
    one_metrics, (one,) = two_steps(single, batch)
    two_metrics, (first, second) = two_steps(pair, batch)
    # Every rank holds the same adapter, and it is the single learner's. Compared per tensor by relative norm:
    # AdamW's step is lr * m / (sqrt(v) + 1e-8), so an element whose gradient is ~0 moves by a share of lr that
    # the gradient's float rounding decides (grpo: layer 0 up_proj lora_B[205, 2] has a first gradient of 1.3e-8
    # against a median of 1.5e-3, and ended 1.1e-5 apart with 2 ranks; that tensor's relative difference 1.3e-4,
    # the others' <= 2e-5). The gradients themselves are checked through grad_norm below.
    for name, value in one.items():
        assert torch.equal(first[name], second[name])
        assert float((first[name] - value).norm() / value.norm().clamp(min=1e-12)) < 1e-3, name
    assert any(float(v.abs().max()) > 0 for n, v in one.items() if "lora_B" in n)
    # ... and so are the metrics, on every rank.
    for step in range(2):
        for key in ("loss", "policy_loss", "kl", "grad_norm", "entropy", "kl_sequence", "rollout/logprob_gap",
                    "response_length_mean"):
            expected = one_metrics[step][0][key]
            for rank in range(2):
                assert two_metrics[step][rank][key] == pytest.approx(expected, rel=1e-4, abs=1e-6), (step, rank, key)


@pytest.mark.slow
def test_a_short_run_with_two_learners_and_micro_batches_logs_the_metrics_of_one_learner(
        warm_model_dir, ray_session, tmp_path):
    """Issue 13's run-level check too: micro_batch_size 32 (one pass) and 5 log the same grad_norm."""
    import json

    from raylign.cluster.driver import train

    common = [f"model.path={warm_model_dir}", "sft.steps=0", "rollout.backend=hf", "train.steps=3",
              "train.prompts_per_step=4", "logging.progress=false", "eval.run_test=false"]
    runs = {}
    for learners, micro_batch_size in ((1, 32), (2, 5)):
        output = tmp_path / f"learners_{learners}"
        train(load_config("configs/quickstart.yaml", [f"output_dir={output}", f"train.num_learners={learners}",
                                                      f"train.micro_batch_size={micro_batch_size}", *common]))
        runs[learners] = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    for one, two in zip(runs[1], runs[2], strict=True):
        assert two["reward_mean"] == one["reward_mean"]
        for key in ("loss", "kl", "grad_norm", "rollout/logprob_gap"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key
