"""The offline stages (SFT, reward models, DPO) on N data-parallel ranks train what one rank trains.

The loops run in-process: two threads, each a rank with its own copy of the model, sum through shared
memory (`ThreadRanks`), so the test checks the loops' arithmetic without starting Ray; one pipeline stage
with two learner actors checks the wiring on Ray.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading

import pytest
import torch

from raylign.common.data import synthetic_review_with_mood
from raylign.common.preference_data import PreferenceExample
from raylign.common.reward_models import ClassifierRewardModel
from raylign.learner import dpo, reward_training, sft
from raylign.learner.data_parallel import Ranks
from tests.test_offline_trainers import LastTokenRewardModel, lora_model, sentiment_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 5 rows do not split evenly over 2 ranks (3 + 2), and the eval sets (7 rows, chunks of 5) neither.
BATCH, STEPS = 5, 3


class ThreadRanks(Ranks):
    """Rank `rank` of a group of threads in this process; `_reduce` sums (or maxes) through a shared list."""

    def __init__(self, rank: int, world_size: int, slots: list, barrier: threading.Barrier):
        super().__init__(rank, world_size)
        self.slots, self.barrier = slots, barrier

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        self.slots[self.rank] = tensor.detach().to(torch.float64).clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        result = stacked.sum(0) if op == "SUM" else stacked.max(0).values
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return result.to(tensor.device, tensor.dtype)


def run_ranks(world_size: int, make_model, train) -> list:
    """`train(model, ranks)` on each of `world_size` thread ranks; every rank's return value, rank order. The
    models are built first, one after the other: torch's seeded RNG is shared by the threads."""
    models = [make_model() for _ in range(world_size)]
    slots, barrier = [None] * world_size, threading.Barrier(world_size, timeout=120)
    results, errors = [None] * world_size, []

    def body(rank: int) -> None:
        try:
            results[rank] = train(models[rank], ThreadRanks(rank, world_size, slots, barrier))
        except BaseException as error:  # a failed rank would leave the others waiting at the barrier
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def trained_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_training(one: list, two: list) -> None:
    """Both ranks of the 2-rank run hold the 1-rank run's weights and history."""
    (one_history, one_weights), = one
    for history, weights in two:
        assert len(history) == len(one_history) == STEPS
        for row, expected in zip(history, one_history):
            assert row.keys() == expected.keys()
            for key, value in expected.items():
                assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (row["step"], key)
        # Per tensor by relative norm, as in tests/test_data_parallel.py: AdamW moves an element whose gradient is
        # ~0 by a share of lr that the gradient's float rounding decides (on the fc-v1272 host one Bradley-Terry
        # element of 32768 ended 1.7e-5 apart). The gradients themselves are checked through the history above.
        for name, value in one_weights.items():
            assert float((weights[name] - value).norm() / value.norm().clamp(min=1e-12)) < 1e-3, name
            assert torch.equal(weights[name], two[0][1][name])  # every rank took the same step


def test_masked_sft_on_two_ranks_trains_the_adapter_and_logs_the_history_of_one(tiny_model_dir, tokenizer):
    # Completions of different lengths: a mean of the ranks' token means would differ from the batch's.
    train_rows = [dataclasses.replace(pair, chosen=pair.chosen * (1 + i % 3)) for i, pair in enumerate(sentiment_pairs(11, 0))]
    eval_rows = sentiment_pairs(7, 1)

    def train(model, ranks):
        history = sft.masked_sft_train(model, tokenizer, train_rows, steps=STEPS, batch_size=BATCH, learning_rate=3e-3,
                                       max_length=48, seed=0, eval_examples=eval_rows, eval_every=2, ranks=ranks)
        return history, trained_weights(model)

    make = lambda: lora_model(tiny_model_dir)  # noqa: E731
    one, two = run_ranks(1, make, train), run_ranks(2, make, train)
    assert_same_training(one, two)
    assert "eval/loss" in one[0][0][1] and "eval/loss" in one[0][0][2]


def test_bradley_terry_reward_model_on_two_ranks_trains_the_weights_of_one(tiny_model_dir, tokenizer):
    train_rows, eval_rows = sentiment_pairs(11, 0), sentiment_pairs(7, 1)

    # Every weight trains, and Adam turns float noise in a near-zero gradient element into a step of up to the
    # learning rate: a small one keeps such elements within the tolerance (grad_norm checks the gradient itself).
    def train(model, ranks):
        history = reward_training.train_reward_model(
            model, tokenizer, train_rows, steps=STEPS, batch_size=BATCH, learning_rate=2e-4, max_length=48, seed=0,
            val_examples=eval_rows, margin=lambda e: 0.1 * len(e.chosen), center_coef=0.01, ranks=ranks)
        return history, trained_weights(model)

    make = lambda: LastTokenRewardModel(tiny_model_dir)  # noqa: E731
    one, two = run_ranks(1, make, train), run_ranks(2, make, train)
    assert_same_training(one, two)
    assert 0 < one[0][0][-1]["val/accuracy"] <= 1


def labelled_reviews(n: int, seed: int) -> list[PreferenceExample]:
    """Reviews of varied length labelled by mood (1 = positive), as a classifier RM's data rows hold them."""
    rng = random.Random(seed)
    return [PreferenceExample(prompt="", label=i % 2,
                              extra={"text": synthetic_review_with_mood(rng, "positive" if i % 2 else "negative")})
            for i in range(n)]


def test_classifier_reward_model_on_two_ranks_trains_the_head_of_one(tiny_model_dir, tokenizer):
    train_rows, eval_rows = labelled_reviews(11, 0), labelled_reviews(7, 1)

    def train(model, ranks):
        history = reward_training.train_reward_classifier(
            model, tokenizer, train_rows, steps=STEPS, batch_size=BATCH, learning_rate=3e-3, max_length=48, seed=0,
            val_examples=eval_rows, eval_every=2, ranks=ranks)
        return history, trained_weights(model)

    def make():
        torch.manual_seed(0)
        # No dropout: each rank would draw its own masks, which one rank's run cannot reproduce.
        return ClassifierRewardModel.from_base(tiny_model_dir, dropout=0.0)

    one, two = run_ranks(1, make, train), run_ranks(2, make, train)
    assert_same_training(one, two)
    # Only the head trains (the body is frozen), and validation ran at step 2 and at the last step.
    assert sorted(one[0][1]) == ["head.0.bias", "head.0.weight", "head.3.bias", "head.3.weight"]
    assert [("val/accuracy" in row) for row in one[0][0]] == [False, True, True]


def test_dpo_on_two_ranks_trains_the_adapter_and_logs_the_rewards_of_one(tiny_model_dir, tokenizer):
    train_rows, eval_rows = sentiment_pairs(11, 0), sentiment_pairs(7, 1)

    # The LoRA A matrices get no gradient at step 1 (B = 0), so step 2 is Adam's first for them and moves every
    # element by about the learning rate whatever its gradient's size, except elements near Adam's eps (1e-8):
    # one at (6, 95) of a q_proj A has gradient -6.24e-8 on one rank and -5.65e-8 summed over two (float32
    # cancellation, 1e-4 of the tensor's largest), which at learning rate 3e-3 was a 2.3e-5 weight difference.
    # At 1e-3 the largest difference is 3.0e-6.
    def train(model, ranks):
        history = dpo.dpo_train(model, tokenizer, train_rows, steps=STEPS, batch_size=BATCH, learning_rate=1e-3,
                                max_length=48, seed=0, beta=0.5, val_examples=eval_rows, ranks=ranks)
        return history, trained_weights(model)

    make = lambda: lora_model(tiny_model_dir)  # noqa: E731
    one, two = run_ranks(1, make, train), run_ranks(2, make, train)
    assert_same_training(one, two)
    # The steps moved the adapter: after the first, the implicit rewards are no longer all zero.
    assert one[0][0][-1]["rewards/margins"] != 0


def test_a_batch_smaller_than_the_group_names_both_fields(tiny_model_dir, tokenizer):
    def train(model, ranks):
        return sft.masked_sft_train(model, tokenizer, sentiment_pairs(4, 0), steps=1, batch_size=1,
                                    learning_rate=1e-3, max_length=48, seed=0, ranks=ranks)

    with pytest.raises(ValueError, match=r"training.batch_size = 1 is smaller than the 2 learners \(resources.num_learners\)"):
        run_ranks(2, lambda: lora_model(tiny_model_dir), train)


# Learning rate 5e-4, not 5e-3: step 2 is Adam's first for the LoRA A matrices (their step-1 gradient is 0 with
# B = 0), and an element whose gradient is near Adam's eps moves by lr * g / (|g| + eps), so its float32 noise
# (the two ranks sum in another order) shows in the weight. At 5e-3 one o_proj A element differed by 9.2e-5
# (0.33 relative); at 5e-4 the largest difference is 1.7e-7 (B, and with it A's gradient, is 10 times smaller too).
DPO_STAGE = """
    output_dir: {out}
    stages:
      - name: dpo
        kind: dpo
        model: {{path: "builtin:tiny-llama", lora: {{r: 4, alpha: 8}}}}
        data: {{source: "builtin:movie-preferences", max_rows: 40, max_eval_rows: 7}}
        training: {{steps: 2, batch_size: 5, learning_rate: 5.0e-4, max_length: 32}}
        resources: {{num_learners: {learners}}}
"""


@pytest.mark.slow
def test_a_dpo_stage_on_two_learner_actors_writes_the_adapter_and_metrics_of_one_trainer(ray_session, tmp_path):
    from safetensors.torch import load_file

    from raylign.cluster.pipeline import run_pipeline
    from raylign.common.pipeline_config import load_pipeline_config
    from raylign.learner.offline_jobs import OfflineTrainer

    path = tmp_path / "pipeline.yaml"
    path.write_text(DPO_STAGE.format(out=tmp_path / "out", learners=2))
    config = load_pipeline_config(path)
    summary = run_pipeline(config)
    assert [row["status"] for row in summary["stages"]] == ["done"]
    # The one-rank reference runs the same stage in this process (no actors to start).
    OfflineTrainer(config.seed).dpo(config.stages[0], str(tmp_path / "one"))
    stages = {"one": tmp_path / "one", "two": tmp_path / "out" / "dpo"}
    metrics = {name: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for name, d in stages.items()}
    adapters = {name: load_file(d / "adapter_model.safetensors") for name, d in stages.items()}
    assert len(metrics["two"]) == 2 and "eval/loss" in metrics["two"][-1]
    for row, expected in zip(metrics["two"], metrics["one"], strict=True):
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    for name, value in adapters["one"].items():
        torch.testing.assert_close(adapters["two"][name], value, atol=1e-5, rtol=1e-4)
    assert json.loads((stages["two"] / "results.json").read_text())["rewards/margins"] != 0


def test_more_learners_than_rows_per_batch_is_refused_naming_the_fields(tmp_path):
    from raylign.common.config import ConfigError
    from raylign.common.pipeline_config import load_pipeline_config

    path = tmp_path / "pipeline.yaml"
    path.write_text(DPO_STAGE.format(out=tmp_path / "out", learners=6))
    with pytest.raises(ConfigError, match=r"stages.dpo.resources.num_learners = 6 is more than training.batch_size = 5"):
        load_pipeline_config(path)
