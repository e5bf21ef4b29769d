"""Pre-flight: each input a user can get wrong is one message on stderr and exit status 2 from `raylign train`,
with no traceback and before Ray starts."""

from __future__ import annotations

import json

import pytest

from raylign.cluster.cli import main


def exact_reward(prompts, completions):
    return [0.0] * len(completions)


def prompts_file(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# (name, overrides, expected message fragment); "{tmp}" is the test's directory.
BAD_INPUTS = [
    ("missing prompts file", ["data.prompts={tmp}/missing.jsonl"],
     "data.prompts = '{tmp}/missing.jsonl' does not exist; give an existing .json/.jsonl file"),
    ("unknown built-in data", ["data.prompts=builtin:tweets"], "data.prompts = 'builtin:tweets' is not a built-in data set"),
    ("missing sft corpus", ["sft.steps=5", "sft.data={tmp}/corpus.jsonl"], "sft.data = '{tmp}/corpus.jsonl' does not exist"),
    ("wrong sft text column", ["sft.steps=5", "sft.text_field=body"], "column 'body' not found"),
    ("wrong prompt column", ["data.prompts={tmp}/no_test.jsonl", "data.prompt_field=question"],
     "column 'question' not found in '{tmp}/no_test.jsonl'"),
    ("missing model directory", ["model.path={tmp}/no-model"], "model.path = '{tmp}/no-model' does not exist"),
    ("unknown reward function", ["reward.function=sentiment"], "reward.function = 'sentiment' is unknown; use one of"),
    ("unimportable reward function", ["reward.function=no_such_module:score"],
     "reward.function = 'no_such_module:score': cannot import module 'no_such_module' (ModuleNotFoundError"),
    ("reward function not in its module", ["reward.function=tests.test_preflight:missing"],
     "reward.function = 'tests.test_preflight:missing': 'tests.test_preflight' has no callable 'missing'"),
    ("unknown reward source", ["reward.function=null", "reward.sources=[{name: vader}]"],
     "reward.sources[0].name = 'vader' is unknown"),
    ("options a reward function does not take",
     ["reward.function=null", "reward.sources=[{name: 'tests.test_preflight:exact_reward', options: {scale: 2}}]"],
     "reward.sources[0].options = {'scale': 2}: tests.test_preflight:exact_reward does not accept them"),
    ("completion longer than the model's positions", ["rollout.max_new_tokens=100000"],
     "rollout.max_new_tokens = 100000 leaves no room for a prompt in the model's 256 positions"),
    ("context longer than the model's positions", ["rollout.max_model_len=100000"],
     "rollout.max_model_len = 100000 exceeds the model's 256 positions"),
    ("prompts that cannot fit with their completion", ["data.prompts={tmp}/long.jsonl", "train.prompts_per_step=2",
                                                       "eval.every=0", "eval.run_test=false"],
     "2 of 2 prompts are longer than 232 tokens"),
    ("more prompts per step than prompts", ["train.prompts_per_step=1000"],
     "train.prompts_per_step = 1000 exceeds the 384 prompts of data.prompts = 'builtin:movie-reviews' (split 'train')"),
    ("empty training split", ["data.split=training"], "data.split = 'training': data.prompts = 'builtin:movie-reviews' has no prompts"),
    ("missing validation split", ["eval.every=1", "eval.val_split=validation"],
     "eval.val_split = 'validation': data.prompts = 'builtin:movie-reviews' has no prompts in that split"),
    ("missing test split", ["data.prompts={tmp}/no_test.jsonl", "train.prompts_per_step=2", "eval.every=0",
                            "eval.run_test=true"], "eval.test_split = 'test': data.prompts = '{tmp}/no_test.jsonl'"),
    ("chat template the tokenizer lacks", ["data.chat_template=true"], "data.chat_template = true, but the tokenizer"),
    ("LoRA targets the model lacks", ["model.lora.target_modules=[c_attn]"], "model.lora.target_modules = ['c_attn']"),
    ("resume from a directory that is no checkpoint", ["train.resume_from={tmp}"], "holds no driver_state.json"),
]


@pytest.mark.parametrize("overrides, fragment", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_a_bad_input_is_one_message_and_exit_status_2_before_ray_starts(overrides, fragment, tiny_model_dir, tmp_path,
                                                                        capfd, monkeypatch):
    from raylign.cluster import driver

    def no_ray(config):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(driver, "start_ray", no_ray)
    prompts_file(tmp_path / "long.jsonl", [{"prompt": "the movie was great " * 80, "split": "train"}] * 2)
    prompts_file(tmp_path / "no_test.jsonl", [{"prompt": f"Review {i}: the film was", "split": "train"} for i in range(4)])
    base = [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "sft.steps=0", "rollout.backend=hf",
            "train.steps=1"]
    status = main(["train", "configs/quickstart.yaml", *base, *(o.replace("{tmp}", str(tmp_path)) for o in overrides)])
    out, err = capfd.readouterr()
    assert status == 2, err
    assert err.startswith("raylign: ") and err.count("raylign: ") == 1, err
    assert fragment.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err and out == ""
