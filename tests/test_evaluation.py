"""Validation and test evaluation through Ray: disjoint prompt sets, hard-text rewards, best adapter."""

import json

import pytest

from raylign.cluster.driver import train
from raylign.common.config import load_config


@pytest.mark.slow
def test_validation_tracks_the_best_adapter_and_test_runs_once(warm_model_dir, ray_session, tmp_path):
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", f"model.path={warm_model_dir}", "sft.steps=0", "rollout.backend=hf",
        "train.steps=6", "logging.progress=false", "eval.every=3", "eval.run_test=true",
        "eval.val_samples=8", "eval.test_samples=8", "eval.samples_per_prompt=2",
    ])
    results = train(config)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validated = [m for m in metrics if "val/reward_mean" in m]
    assert [m["step"] for m in validated] == [2, 5]
    best = max(validated, key=lambda m: m["val/reward_mean"])
    assert results["best_val_reward"] == best["val/reward_mean"]
    assert results["test/adapter"] == f"best (step {best['step']})"
    best_state = json.loads((tmp_path / "checkpoints" / "best" / "driver_state.json").read_text())
    assert best_state == {"step": best["step"], "val_reward_mean": best["val/reward_mean"]}
    assert (tmp_path / "checkpoints" / "best" / "adapter" / "adapter_model.safetensors").is_file()
    for key in ["reward_mean", "kl", "distinct_1", "self_bleu", "pass@2", "reference_perplexity"]:
        assert f"test/{key}" in results
    assert results["test/kl"] >= 0.0
    assert results["test/prompts"] == 8
    val = {json.loads(line)["prompt"] for line in (tmp_path / "val_samples.jsonl").read_text().splitlines()}
    test = {json.loads(line)["prompt"] for line in (tmp_path / "test_samples.jsonl").read_text().splitlines()}
    train_prompts = {json.loads(line)["prompt"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()}
    assert val and test and val.isdisjoint(test) and val.isdisjoint(train_prompts) and test.isdisjoint(train_prompts)
    assert "steps_to_80pct" in results


@pytest.mark.slow
def test_eval_refuses_data_without_disjoint_splits(warm_model_dir, ray_session, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The movie number {i} was"}) + "\n" for i in range(8)))
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.path={warm_model_dir}", "sft.steps=0", "rollout.backend=hf",
        f"data.prompts={prompts}", "train.steps=1", "logging.progress=false", "eval.every=1",
    ])
    with pytest.raises(ValueError, match="appear in more than one of the splits"):
        train(config)


@pytest.mark.slow
def test_seeds_list_runs_each_seed_and_the_report_compares_them(warm_model_dir, ray_session, tmp_path):
    from raylign.cluster.driver import train_each_seed
    from raylign.cluster.report import write_report

    runs = []
    for method in ["grpo", "rloo"]:
        config = load_config("configs/quickstart.yaml", [
            f"output_dir={tmp_path / method}", f"model.path={warm_model_dir}", "sft.steps=0", "rollout.backend=hf",
            "train.steps=3", "train.prompts_per_step=4", "logging.progress=false", "seeds=[1, 2]", f"algorithm.name={method}",
            "eval.every=0", "eval.run_test=false",  # the report's test-set rows are covered in tests/test_report.py
        ])
        results = train_each_seed(config)
        assert [r["output_dir"] for r in results] == [str(tmp_path / method / f"seed_{s}") for s in (1, 2)]
        runs += [tmp_path / method / f"seed_{s}" for s in (1, 2)]
    comparison = write_report(runs, tmp_path / "report")
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "comparison.tex").is_file()
    assert set(comparison["methods"]) == {"grpo", "rloo"}


@pytest.mark.slow
def test_evaluation_reports_reward_per_prompt_category(warm_model_dir, ray_session, tmp_path):
    rows = []
    for i in range(24):
        split = "train" if i < 16 else ("val" if i < 20 else "test")
        category = "praise" if i % 2 else "critique"
        rows.append({"prompt": f"Review {i}: honestly, the movie was", "split": split, "category": category})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.path={warm_model_dir}", "sft.steps=0", "rollout.backend=hf",
        f"data.prompts={prompts}", "data.category_field=category", "train.steps=2", "logging.progress=false",
        "eval.run_test=true", "eval.samples_per_prompt=2",
    ])
    results = train(config)
    test = [json.loads(line) for line in (tmp_path / "run" / "test_samples.jsonl").read_text().splitlines()]
    for category, parity in (("praise", 1), ("critique", 0)):
        rewards = [s["reward"] for s in test if int(s["prompt"].split()[1][:-1]) % 2 == parity]
        assert results[f"test/category/{category}/reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
