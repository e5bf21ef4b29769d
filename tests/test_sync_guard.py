"""The learner notices when the rollout actors did not pick up a published adapter."""


import pytest
import torch

from raylign.actors.rollout_worker import RolloutWorker
from raylign.cluster.driver import SyncError, check_sync
from raylign.common.config import load_config
from raylign.common.types import AdapterUpdate, PromptItem
from raylign.learner.learner_worker import LearnerWorker


def learner_and_rollout(model_dir, *overrides):
    """The quickstart's learner on `model_dir` and a transformers rollout worker holding its first adapter."""
    config = load_config("configs/quickstart.yaml", [f"model.path={model_dir}", "rollout.backend=hf", *overrides])
    learner = LearnerWorker(model_dir, config.model, config.train, config.algorithm, config.rollout, seed=0)
    learner.attach_lora()
    rollout = RolloutWorker("hf", model_dir, dtype=config.model.dtype)
    rollout.load_update(learner.publish())
    return config, learner, rollout


@pytest.fixture(scope="module")
def pair(warm_model_dir):
    config, learner, rollout = learner_and_rollout(warm_model_dir, "train.learning_rate=0.05")
    settings = load_settings(config)
    return config, learner, rollout, settings


def load_settings(config):
    from raylign.common.types import SamplingSettings

    r = config.rollout
    return SamplingSettings(r.samples_per_prompt, r.max_new_tokens, r.min_new_tokens, r.temperature)


def prompts(token_ids):
    return [PromptItem(index=i, text="", token_ids=token_ids, seed=100 + i) for i in range(4)]


def test_behaviour_logprobs_match_learner_after_publish_and_guard_fires_when_publish_is_skipped(pair):
    config, learner, rollout, settings = pair
    prompt_ids = learner.tokenizer("Honestly, the movie was").input_ids

    samples = rollout.generate(prompts(prompt_ids), settings)
    metrics = learner.train_step(samples, [float(i % 3) for i in range(len(samples))])
    assert metrics["rollout/logprob_gap"] < 1e-5
    check_sync(metrics, config.rollout.sync_tolerance, step=0)

    stale = learner.publish()  # version 1, the one the rollout should load next
    learner.train_step(rollout_with(rollout, stale, prompt_ids, settings), [float(i % 3) for i in range(16)])
    # A broken broadcast: the actor is told "version 2" but keeps version-1 weights.
    rollout.load_update(AdapterUpdate(version=learner.version, files=stale.files))
    samples = rollout.generate(prompts(prompt_ids), settings)
    metrics = learner.train_step(samples, [float(i % 3) for i in range(len(samples))])
    assert metrics["rollout/logprob_gap"] > 10 * config.rollout.sync_tolerance
    with pytest.raises(SyncError, match="not sampling from the adapter"):
        check_sync(metrics, config.rollout.sync_tolerance, step=2)


def rollout_with(rollout, update, prompt_ids, settings):
    rollout.load_update(update)
    return rollout.generate(prompts(prompt_ids), settings)


def test_top_p_sampling_on_the_transformers_engine_keeps_the_gap_within_tolerance(warm_model_dir):
    config, learner, rollout = learner_and_rollout(warm_model_dir, "rollout.top_p=0.9", "rollout.top_k=40")
    from raylign.common.types import SamplingSettings

    r = config.rollout
    settings = SamplingSettings(r.samples_per_prompt, r.max_new_tokens, r.min_new_tokens, r.temperature, r.top_p, r.top_k)
    samples = rollout.generate(prompts(learner.tokenizer("Honestly, the movie was").input_ids), settings)
    metrics = learner.train_step(samples, [float(i % 3) for i in range(len(samples))])
    assert metrics["rollout/logprob_gap"] < 1e-4
    check_sync(metrics, config.rollout.sync_tolerance, step=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_stale_sample_is_checked_under_the_adapter_version_that_generated_it(warm_model_dir, dtype):
    # bfloat16 runs under autocast, whose cast cache would hide the older version's weights (gap 1.15).
    config, learner, rollout = learner_and_rollout(warm_model_dir, "train.learning_rate=0.05", "rollout.max_staleness=1",
                                                   "algorithm.importance_sampling_cap=2.0", f"model.dtype={dtype}")
    settings = load_settings(config)
    prompt_ids = learner.tokenizer("Honestly, the movie was").input_ids
    rewards = [float(i % 3) for i in range(16)]
    version_0 = rollout.generate(prompts(prompt_ids), settings)
    learner.train_step(version_0, rewards)
    # One version old: accepted, reweighted, and checked under version 0's weights, so the guard stays exact
    # although the learner has moved (version 1 scores the same tokens far off).
    metrics = learner.train_step(version_0, rewards)
    assert metrics["rollout/logprob_gap"] < 1e-5 and metrics["importance_weight_mean"] != 1.0
    rollout.load_update(learner.publish())
    with pytest.raises(RuntimeError, match="accepts versions 1..2"):
        learner.train_step(version_0, rewards)


def test_bfloat16_weights_learn_under_autocast_with_float32_adapters_and_the_guard_still_catches_a_skipped_publish(
        warm_model_dir):
    config, learner, rollout = learner_and_rollout(warm_model_dir, "model.dtype=bfloat16", "train.learning_rate=0.05")
    assert config.rollout.sync_tolerance == 1e-2  # the bf16 default: vLLM's kernels round ~1e-3 away from the learner's
    assert learner.model.config._attn_implementation == "eager"  # model.attn_implementation 'auto' on CPU, in bf16
    assert {p.dtype for p in learner.trainable_parameters} == {torch.float32}
    settings = load_settings(config)
    prompt_ids = learner.tokenizer("Honestly, the movie was").input_ids

    before = [p.detach().clone() for p in learner.trainable_parameters]
    samples = rollout.generate(prompts(prompt_ids), settings)
    metrics = learner.train_step(samples, [float(i % 3) for i in range(len(samples))])
    # The same kernels in the same precision on both sides (sdpa's KV-cached decode would be ~2e-3 away).
    assert metrics["rollout/logprob_gap"] < 1e-5
    check_sync(metrics, config.rollout.sync_tolerance, step=0)
    assert {p.dtype for p in learner.trainable_parameters} == {torch.float32}
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.trainable_parameters))

    stale = learner.publish()
    learner.train_step(rollout_with(rollout, stale, prompt_ids, settings), [float(i % 3) for i in range(16)])
    rollout.load_update(AdapterUpdate(version=learner.version, files=stale.files))  # told v2, keeps v1's weights
    metrics = learner.train_step(rollout.generate(prompts(prompt_ids), settings), [float(i % 3) for i in range(16)])
    assert metrics["rollout/logprob_gap"] > 2 * config.rollout.sync_tolerance
    with pytest.raises(SyncError, match="not sampling from the adapter"):
        check_sync(metrics, config.rollout.sync_tolerance, step=2)


def test_the_live_adapter_publishes_and_loads_exactly_what_peft_does(tiny_model_dir):
    """LiveAdapter (common/lora.py) replaces PEFT's get_/set_peft_model_state_dict walks in the publish: the
    same bytes as PEFT's path after a training step, the same weights on the engine, a misfit refused."""
    from peft import get_peft_model_state_dict

    from raylign.common.lora import adapter_files, adapter_state_dict

    config, learner, rollout = learner_and_rollout(tiny_model_dir, "train.learning_rate=0.05")
    samples = rollout.generate(prompts(learner.tokenizer("Honestly, the movie was").input_ids), load_settings(config))
    learner.train_step(samples, [float(i % 3) for i in range(len(samples))])  # the adapter changes in place

    update = learner.publish()
    assert update.files == adapter_files(learner.model, learner.version)  # PEFT's walk: byte for byte
    rollout.load_update(update)
    engine_state = get_peft_model_state_dict(rollout.engine.model)
    published = adapter_state_dict(update.files)
    assert engine_state.keys() == published.keys()
    assert all(torch.equal(engine_state[name], tensor) for name, tensor in published.items())
    with pytest.raises(RuntimeError, match="does not fit this model's adapter"):
        rollout.engine.adapter.load({"base_model.model.not_a_layer.lora_A.weight": torch.zeros(1)}, version=9)


@pytest.mark.parametrize("family, adapted, siblings", [
    ("llama", ["q_proj", "v_proj"], ["k_proj", "o_proj"]),  # vLLM fuses q/k/v: k must reach the reload too
    ("gpt2", ["c_attn"], ["c_proj"]),  # Conv1D layers with biases
    ("qwen2", ["q_proj", "v_proj"], ["k_proj", "o_proj"]),  # q/k/v biases inside the fused layer
])
def test_merged_weights_name_every_linear_layer_beside_an_adapted_one(twin_dirs, family, adapted, siblings):
    """`merged_lora_weights`: W + delta for an adapted layer, W as it is for an unadapted linear layer under the
    same parent, biases included; nothing from parents without an adapted layer (the MLP here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raylign.common.lora import merged_lora_weights

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(twin_dirs[family])
    base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=adapted))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    weights = merged_lora_weights(model)
    attention = "transformer.h.0.attn" if family == "gpt2" else "model.layers.0.self_attn"
    expected = {f"{attention}.{layer}.{kind}" for layer in adapted + siblings for kind in ("weight", "bias")
                if f"{attention}.{layer}.{kind}" in base_state}
    assert {name for name in weights if name.startswith(f"{attention}.")} == expected
    assert not any(".mlp." in name for name in weights)
    for layer in siblings:
        assert torch.equal(weights[f"{attention}.{layer}.weight"], base_state[f"{attention}.{layer}.weight"])
    for layer in adapted:
        module = model.base_model.model.get_submodule(f"{attention}.{layer}")
        delta = module.get_delta_weight("default")
        assert delta.abs().max() > 0
        torch.testing.assert_close(weights[f"{attention}.{layer}.weight"], base_state[f"{attention}.{layer}.weight"] + delta)
    biased = {"gpt2": "c_attn", "qwen2": "k_proj"}.get(family)
    if biased:
        assert torch.equal(weights[f"{attention}.{biased}.bias"], base_state[f"{attention}.{biased}.bias"])


@pytest.mark.parametrize("family, lora, refused", [
    ("llama", {"target_modules": ["q_proj"], "use_dora": True}, "has DoRA"),
    ("llama", {"target_modules": ["q_proj"], "lora_bias": True}, "has a LoRA bias"),
    ("llama", {"target_modules": ["embed_tokens"]}, "has a LoRA on an embedding"),
    ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["v_proj"]}, "is trained whole"),
    ("gpt2", {"target_modules": ["lm_head"]}, "output head tied to the input embeddings"),
])
def test_merged_weights_refuse_an_adapter_that_w_plus_ba_does_not_describe(twin_dirs, family, lora, refused):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raylign.common.lora import merged_lora_weights

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(twin_dirs[family]), LoraConfig(r=4, **lora))
    with pytest.raises(ValueError, match=rf"merged weights: .*{refused}.*rollout.weight_sync=lora"):
        merged_lora_weights(model)


def test_a_nan_logprob_gap_fails_the_sync_guard():
    """NaN compares false with any tolerance: an engine left with uninitialised weights must still stop the run."""
    with pytest.raises(SyncError, match="gap is nan"):
        check_sync({"rollout/logprob_gap": float("nan")}, tolerance=1e-4, step=0)


def test_merged_weights_naming_fewer_layers_than_the_last_leave_no_layer_of_the_last_merged(twin_dirs):
    """An all-linear version, then one on q_proj/v_proj only: the worker restores the model's own weights first,
    so the engine holds exactly the second adapter merged (the transformers engine here; vLLM in
    tests/test_vllm_rollout.py)."""
    from raylign.actors.rollout_worker import RolloutWorker
    from raylign.common.lora import adapter_files
    from raylign.common.types import AdapterUpdate
    from tests.test_vllm_rollout import random_adapter

    llama = twin_dirs["llama"]
    worker = RolloutWorker("hf", llama, weight_sync="merged")
    for version, model in enumerate([random_adapter(llama, seed=2), random_adapter(llama, seed=1, target_modules=["q_proj", "v_proj"])]):
        worker.load_update(AdapterUpdate(version=version, files=adapter_files(model, version)))
    expected = model.merge_and_unload().state_dict()
    engine = worker.engine.model.state_dict()
    assert engine.keys() == expected.keys()
    for name, tensor in engine.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)


def test_an_adapter_merged_weights_cannot_carry_is_refused_when_the_learner_attaches_it(tiny_model_dir):
    """The rollout actors merge the published adapter; an adapter they could not merge stops the run before
    step 0, in the learner, naming the layer and the fix (not at the actors' first merge)."""
    config = load_config("configs/quickstart.yaml", [
        f"model.path={tiny_model_dir}", "rollout.backend=hf", "rollout.weight_sync=merged",
        "model.lora.target_modules=[q_proj,embed_tokens]"])
    learner = LearnerWorker(tiny_model_dir, config.model, config.train, config.algorithm, config.rollout, seed=0)
    with pytest.raises(ValueError, match=r"embed_tokens has a LoRA on an embedding.*rollout.weight_sync=lora"):
        learner.attach_lora()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_rollout_side_merge_equals_the_learners_model_merged_and_keeps_its_base_copy(twin_dirs, dtype):
    """The merger's weights are the learner's W + delta (float32 adapters on a base of the run's dtype, as the
    learner holds them), rounded once to the base's dtype; a later version of the same layout, or an adapter that
    differs only in where it was saved from, reuses the merger's base copy instead of loading another."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raylign.common.lora import AdapterMerger, LiveAdapter, adapter_files
    from raylign.common.precision import DTYPES

    llama = twin_dirs["llama"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama, dtype=DTYPES[dtype]),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    merger = AdapterMerger(llama, DTYPES[dtype])
    for version in range(2):
        generator = torch.Generator().manual_seed(version)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        weights = merger.merged_weights(AdapterUpdate(version, adapter_files(model, version, LiveAdapter(model))))
        if version == 0:
            base_copy = merger.model
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        expected = (layer.get_base_layer().weight + layer.get_delta_weight("default")).to(DTYPES[dtype])
        assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == DTYPES[dtype]
        assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], expected)
    assert merger.model is base_copy
    model.peft_config["default"].base_model_name_or_path = "/another/copy/of/the/model"
    merger.merged_weights(AdapterUpdate(2, adapter_files(model, 2)))
    assert merger.model is base_copy
