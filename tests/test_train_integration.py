"""GRPO through Ray end to end: rollout actors, reward actor, learner, adapter broadcast."""

import json

import pytest

from raylign.cluster.driver import train
from raylign.common.config import load_config

# The quickstart's demo settings (a strong KL, a gentle learning rate) trade speed for a policy that stays
# fluent; these tests check the mechanics in 16 steps, with the faster settings they were written for.
# Validation and the test evaluation (the quickstart's 64 prompts x 4) are checked in tests/test_evaluation.py.
MECHANICS = ["train.learning_rate=3e-3", "algorithm.kl_coef=0.02", "eval.every=0", "eval.run_test=false"]
REQUIRED_METRICS = {"step", "reward_mean", "reward_std", "kl", "loss", "grad_norm", "policy_version",
                    "rollout/logprob_gap", "time/generate_s", "time/reward_s", "time/learn_s", "time/publish_s", "time/step_s"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_grpo_raises_reward_and_rollouts_follow_every_publish(backend, warm_model_dir, ray_session, tmp_path):
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", f"model.path={warm_model_dir}", "sft.steps=0", *MECHANICS, f"rollout.backend={backend}",
        "train.steps=16", "logging.progress=false", "train.checkpoint_every=8",
    ])
    results = train(config)

    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 16
    assert REQUIRED_METRICS <= set(metrics[0])
    assert [m["policy_version"] for m in metrics] == list(range(1, 17))
    # After each publish the rollout actors' behaviour logprobs equal the learner's on the same tokens.
    assert max(m["rollout/logprob_gap"] for m in metrics) < 1e-4
    first = sum(m["reward_mean"] for m in metrics[:4]) / 4
    last = sum(m["reward_mean"] for m in metrics[-4:]) / 4
    assert last > first + 0.2, (first, last)

    assert results["reward_last_10pct"] > results["reward_first_10pct"]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 * config.logging.samples_per_step
    assert {"prompt", "completion", "reward", "policy_version"} <= set(samples[0])
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "step_000008" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "step_000016" / "driver_state.json").is_file()


@pytest.mark.slow
def test_builtin_model_is_built_and_warm_started_by_sft_before_rl(ray_session, tmp_path):
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", "rollout.backend=hf", "sft.steps=40", "train.steps=2", "logging.progress=false",
        "eval.every=0", "eval.run_test=false",
    ])
    results = train(config)
    assert (tmp_path / "base_model" / "config.json").is_file()
    assert (tmp_path / "sft_model" / "model.safetensors").is_file()
    assert results["sft_loss_last"] < results["sft_loss_first"] - 1.0
    assert results["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo", "reinforce", "rloo"])
def test_each_policy_gradient_method_raises_reward(method, warm_model_dir, ray_session, tmp_path):
    overrides = [
        f"output_dir={tmp_path}", f"model.path={warm_model_dir}", "sft.steps=0", *MECHANICS, "rollout.backend=hf",
        f"algorithm.name={method}", "train.steps=16", "logging.progress=false",
    ]
    if method == "reinforce":
        overrides += ["train.grad_variance_every=8", "train.grad_variance_batches=3"]
    if method == "ppo":
        overrides += ["algorithm.epochs=2", "algorithm.num_minibatches=2", "algorithm.kl_controller=adaptive",
                      "algorithm.kl_target=0.5", "algorithm.kl_horizon=200"]
    train(load_config("configs/quickstart.yaml", overrides))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = sum(m["reward_mean"] for m in metrics[:4]) / 4
    last = sum(m["reward_mean"] for m in metrics[-4:]) / 4
    assert last > first + 0.2, (method, first, last)
    assert all(m["kl_placement"] == "reward" for m in metrics)
    if method == "reinforce":
        probes = [json.loads(line) for line in (tmp_path / "gradient_variance.jsonl").read_text().splitlines()]
        assert [p["step"] for p in probes] == [0, 8]
        assert all(p["num_batches"] == 3 and p["trace_covariance"] > 0 and p["variance_ratio"] > 0 for p in probes)
    if method == "ppo":
        assert {"value_loss", "explained_variance"} <= set(metrics[-1])
        # KL above the 0.5 target pushes the adaptive coefficient up.
        assert metrics[-1]["kl_sequence"] > 0.5 and metrics[-1]["kl_coef"] > metrics[0]["kl_coef"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grade", "grade_ste"])
def test_grade_raises_the_hard_text_reward_and_is_evaluated_by_rollout_actors(
        method, warm_model_dir, sentiment_classifier_dir, ray_session, tmp_path):
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", f"model.path={warm_model_dir}", "sft.steps=0", *MECHANICS, "rollout.backend=hf",
        f"algorithm.name={method}", f"algorithm.reward_model={sentiment_classifier_dir}", "algorithm.kl_coef=0.01",
        "algorithm.anneal_steps=20", "train.learning_rate=0.01", "train.steps=20", "logging.progress=false",
        "reward.function=null", f"reward.sources=[{{name: classifier_rm, path: '{sentiment_classifier_dir}'}}]",
        # Validation and gradient-variance probes are the same code for both variants: checked on GRADE alone.
        *(["eval.every=10", "eval.val_samples=8", "eval.samples_per_prompt=2", "train.grad_variance_every=10",
           "train.grad_variance_batches=2"] if method == "grade" else ["eval.every=0", "eval.run_test=false"]),
    ])
    train(config)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Reported rewards are the reward actor's scores of hard decoded text, like every other method's.
    first = sum(m["reward_mean"] for m in metrics[:5]) / 5
    last = sum(m["reward_mean"] for m in metrics[-5:]) / 5
    assert last > first + 0.1, (method, first, last)
    assert metrics[0]["kl"] < 1e-6  # policy == reference at step 0
    assert metrics[0]["tau"] == 2.0 and metrics[-1]["tau"] < metrics[0]["tau"]
    assert {"reward_soft", "peak_memory_bytes", "grad_norm"} <= set(metrics[-1])
    if method == "grade":
        validated = [m for m in metrics if "val/reward_mean" in m]
        assert [m["step"] for m in validated] == [9, 19]
        probes = [json.loads(line) for line in (tmp_path / "gradient_variance.jsonl").read_text().splitlines()]
        assert [p["step"] for p in probes] == [0, 10] and all(p["trace_covariance"] > 0 for p in probes)
