"""What a real model brings: pad-less tokenizers, chat templates that refuse roles, architectures vLLM cannot serve
with LoRA, prompts longer than the context. Each is either handled by one rule or refused with one message naming
the field, the value and the fix."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from raylign.cluster.prompts import PromptEncoder
from raylign.common.config import ConfigError, load_config
from raylign.common.engine_support import VllmSupport, plan_engine
from raylign.common.model_checks import check_lora_targets
from raylign.common.preference_data import PreferenceExample
from raylign.common.prompt_budget import PromptLimit, default_max_model_len, fit_prompts
from raylign.common.prompt_completion import check_chat_template, encode_preference_pairs, encode_prompt, pad_token_id

# ----- padding -----


def test_pad_id_is_the_pad_token_else_eos_else_zero(twin_dirs):
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(twin_dirs["gpt2"])
    llama = AutoTokenizer.from_pretrained(twin_dirs["llama"])
    assert gpt2.pad_token_id is None and pad_token_id(gpt2) == gpt2.eos_token_id
    assert pad_token_id(llama) == llama.pad_token_id != llama.eos_token_id
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert AutoTokenizer.from_pretrained(twin_dirs["gpt2"]).pad_token is None  # the saved tokenizer is left alone


def test_sequence_classification_reward_is_read_at_the_last_attended_token_even_when_pad_is_eos(twin_dirs):
    """SmolLM2 pads with its EOS, which also ends every scored sequence: transformers' own pooling (the last
    token that is not the pad id) would score the token before EOS."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raylign.common.reward_models import SequenceClassificationRewardModel

    tokenizer = AutoTokenizer.from_pretrained(twin_dirs["smollm2"])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    body = AutoModelForSequenceClassification.from_pretrained(twin_dirs["smollm2"], num_labels=1)
    model = SequenceClassificationRewardModel(body, tokenizer).eval()
    short = tokenizer("The plot was dull.").input_ids + [tokenizer.eos_token_id]
    long = tokenizer("Honestly, the movie was great and I would watch it again.").input_ids + [tokenizer.eos_token_id]
    batched = model._score_rows([short, long], batch_size=2)
    with torch.no_grad():
        logits = body.score(body.model(torch.tensor([short])).last_hidden_state)[0, :, 0]
    assert batched[0] == pytest.approx(logits[-1].item(), abs=1e-5)  # the EOS position
    assert abs(logits[-1].item() - logits[-2].item()) > 1e-3  # ... which is not the token before it
    assert batched == pytest.approx(model._score_rows([short], 1) + model._score_rows([long], 1), abs=1e-5)


# ----- preference pairs -----


class WordTokenizer:
    """One token per word, EOS id 0, no BOS, no chat template: token counts are exact."""

    eos_token_id, bos_token_id, chat_template, name_or_path = 0, None, None, "words"

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[len(word) + 1 for word in text.split()])


def test_preference_pairs_truncate_the_prompt_once_so_chosen_and_rejected_see_the_same_prompt_tokens():
    """The case from issue 13: a 40-token prompt, max_length 48, a 5-token chosen and a 30-token rejected."""
    example = PreferenceExample(prompt=" ".join(["word"] * 40), chosen="a b c d", rejected=" ".join(["x"] * 29))
    [((chosen_prompt, chosen), (rejected_prompt, rejected))] = encode_preference_pairs(WordTokenizer(), [example], max_length=48)
    assert chosen_prompt == rejected_prompt and len(chosen_prompt) == 24
    assert (len(chosen), len(rejected)) == (5, 24)


# ----- chat templates -----


def test_a_chat_template_that_refuses_the_roles_is_one_message_naming_the_field(twin_dirs):
    from transformers import AutoTokenizer

    gemma = AutoTokenizer.from_pretrained(twin_dirs["gemma"])
    conversation = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match=r"stages.dpo.model.chat_template: the chat template of .* rejects a conversation "
                                         r"with the roles \[system, user, assistant\]: System role not supported.*"
                                         r"set stages.dpo.model.chat_template=false"):
        check_chat_template(gemma, [conversation[1:], conversation], None, "stages.dpo.model.chat_template")
    check_chat_template(gemma, [conversation], False, "stages.dpo.model.chat_template")  # plain text: nothing to render
    ids = encode_prompt(gemma, "Hi")
    assert ids[0] == gemma.bos_token_id and ids.count(gemma.bos_token_id) == 1  # BOS from the template, not twice


# ----- LoRA targets -----


def test_lora_target_modules_that_match_nothing_name_the_layers_the_model_has(twin_dirs):
    with pytest.raises(ValueError, match=r"model.lora.target_modules = \['q_proj', 'v_proj'\]: \['q_proj', 'v_proj'\] "
                                         r"match no layer of GPT2LMHeadModel .* adaptable layers are \[.*'c_attn'.*\]"):
        check_lora_targets(twin_dirs["gpt2"], ["q_proj", "v_proj"], "model.lora.target_modules")
    with pytest.raises(ValueError, match=r"\['c_atn'\] match no layer"):
        check_lora_targets(twin_dirs["gpt2"], ["c_attn", "c_atn"], "model.lora.target_modules")
    check_lora_targets(twin_dirs["gpt2"], ["c_attn"], "model.lora.target_modules")
    check_lora_targets(twin_dirs["pythia"], ["query_key_value"], "model.lora.target_modules")


# ----- model directories -----


def test_a_model_directory_without_a_tokenizer_is_refused_at_load(twin_dirs, tmp_path):
    import shutil

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{twin_dirs['gpt2']}/{name}", weights_only / name)
    with pytest.raises(ConfigError, match=r"model.path = '.*weights-only' has no tokenizer .* tokenizer.save_pretrained"):
        load_config("configs/quickstart.yaml", [f"model.path={weights_only}"])


def test_builtin_model_names_are_the_twin_families():
    for family in ("gpt2", "pythia", "gemma", "smollm2", "qwen2", "qwen3", "llama"):
        assert load_config("configs/quickstart.yaml", [f"model.path=builtin:tiny-{family}", "rollout.backend=hf"])
    with pytest.raises(ConfigError, match=r"model.path = 'builtin:tiny-mistral' is not a built-in model; use one of .*'builtin:tiny-gemma'"):
        load_config("configs/quickstart.yaml", ["model.path=builtin:tiny-mistral"])


# ----- the rollout engine -----


def support(cpu=True, registered=True, lora=True):
    return VllmSupport(version="0.32.0", cpu=cpu, architecture="GPT2LMHeadModel", registered=registered, lora=lora)


@pytest.mark.parametrize("build, weight_sync, expected", [
    (support(lora=True), None, ("vllm", "lora")),
    (support(lora=False), None, ("vllm", "merged")),  # vLLM without LoRA, merged weights (reloaded and repacked on CPU)
    (support(cpu=False, lora=False), None, ("vllm", "merged")),
    (support(registered=False, lora=False), None, ("hf", "lora")),
    (support(cpu=False, lora=True), "merged", ("vllm", "merged")),
    (support(lora=True), "merged", ("vllm", "merged")),
])
def test_the_engine_follows_what_the_installed_vllm_supports_for_the_architecture(build, weight_sync, expected):
    plan = plan_engine("vllm", weight_sync, "GPT2LMHeadModel", build)
    assert (plan.backend, plan.weight_sync) == expected
    assert plan.reason


@pytest.mark.parametrize("build, weight_sync, message", [
    (support(lora=False), "lora", r"has no LoRA support for GPT2LMHeadModel; set rollout.weight_sync=merged .*rollout.backend=hf .* remove rollout.weight_sync"),
    (support(cpu=False, lora=False), "lora", r"set rollout.weight_sync=merged .*rollout.backend=hf"),
    (support(registered=False, lora=False), "lora", r"has no model for GPT2LMHeadModel; set rollout.backend=hf"),
    (None, None, r"vLLM is not installed"),
])
def test_an_explicit_weight_sync_the_engine_cannot_serve_is_refused_naming_the_alternatives(build, weight_sync, message):
    with pytest.raises(ValueError, match=message):
        plan_engine("vllm", weight_sync, "GPT2LMHeadModel", build)


def test_vllms_answers_are_kept_per_installation_and_asked_again_only_for_what_is_new(tmp_path, monkeypatch):
    from raylign.common import engine_support

    probed = []

    def fake_probe(command, **_):
        architectures = command[3:]
        probed.append(architectures)
        answers = {a: {"version": "0.32.0", "cpu": True, "registered": True, "lora": a != "GPT2LMHeadModel"} for a in architectures}
        return SimpleNamespace(returncode=0, stdout="INFO noise\n" + json.dumps(answers), stderr="")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(engine_support.subprocess, "run", fake_probe)
    monkeypatch.setattr(engine_support, "installed_vllm", lambda: "vllm/__init__.py@1")
    monkeypatch.setattr(engine_support, "_SUPPORT", {})
    engine_support.ask_vllm("LlamaForCausalLM", "GPT2LMHeadModel")
    assert engine_support.registry_cache_path() == tmp_path / "raylign" / "vllm_registry.json"
    # A new process (an empty in-memory table) asks only about the architecture the cache lacks.
    monkeypatch.setattr(engine_support, "_SUPPORT", {})
    engine_support.ask_vllm("GPT2LMHeadModel", "Qwen3ForCausalLM")
    assert probed == [["LlamaForCausalLM", "GPT2LMHeadModel"], ["Qwen3ForCausalLM"]]
    assert engine_support._SUPPORT["GPT2LMHeadModel"].lora is False and engine_support._SUPPORT["Qwen3ForCausalLM"].lora
    # vLLM reinstalled: every answer is asked again.
    monkeypatch.setattr(engine_support, "installed_vllm", lambda: "vllm/__init__.py@2")
    engine_support.ask_vllm("GPT2LMHeadModel")
    assert probed[-1] == ["GPT2LMHeadModel"]
    # An unreadable cache, or one that is not this module's, is asked again too, never a crash.
    for text in ("{not json", "null", '{"installation": "vllm/__init__.py@2", "answers": []}'):
        engine_support.registry_cache_path().write_text(text)
        engine_support.ask_vllm("LlamaForCausalLM")
        assert probed[-1] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_cli_gpt2_twin_on_vllm_with_explicit_lora_exits_2_with_one_message():
    result = subprocess.run(
        [sys.executable, "-m", "raylign", "train", "configs/quickstart.yaml", "model.path=builtin:tiny-gpt2",
         "rollout.weight_sync=lora"], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 2
    assert "rollout.backend = 'vllm' with rollout.weight_sync = 'lora'" in result.stderr
    assert "no LoRA support for GPT2LMHeadModel; set rollout.weight_sync=merged" in result.stderr
    assert "Traceback" not in result.stderr


# ----- the prompt budget -----


def test_the_prompt_limit_is_the_context_minus_max_new_tokens_or_max_prompt_tokens():
    assert PromptLimit.of(None, None, 24, 256).tokens == 232
    assert PromptLimit.of(32, None, 24, 256) == PromptLimit(32, "data.max_prompt_tokens = 32")
    assert PromptLimit.of(None, 100, 24, 256).tokens == 76
    with pytest.raises(ValueError, match=r"rollout.max_model_len = 300 exceeds the model's 256 positions"):
        PromptLimit.of(None, 300, 24, 256)
    with pytest.raises(ValueError, match=r"rollout.max_new_tokens = 300 leaves no room for a prompt in the model's 256 positions"):
        PromptLimit.of(None, None, 300, 256)
    assert default_max_model_len(None, None, 40, 24, 256) == 64
    assert default_max_model_len(None, 32, 10, 24, 256) == 56
    assert default_max_model_len(None, None, 250, 24, 256) == 256
    assert default_max_model_len(128, None, 10, 24, 256) == 128


def test_long_prompts_are_refused_truncated_from_the_left_keeping_bos_or_dropped():
    limit = PromptLimit(4, "data.max_prompt_tokens = 4")
    prompts = [[1, 5, 6], [1, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match=r"here: 2 of 3 prompts are longer than 4 tokens \(data.max_prompt_tokens = 4\); "
                                         r"the longest has 6. Set data.prompt_overflow=truncate_left"):
        fit_prompts(prompts, limit, "error", bos_token_id=1, where="here")
    truncated = fit_prompts(prompts, limit, "truncate_left", bos_token_id=1, where="here")
    assert truncated.token_ids == [[1, 5, 6], [1, 7, 8, 9], [6, 7, 8, 9]] and truncated.truncated == [False, True, True]
    dropped = fit_prompts(prompts, limit, "drop", bos_token_id=1, where="here")
    assert dropped.kept == [0] and dropped.dropped == 2 and dropped.counts(3) == {"total": 3, "kept": 1, "truncated": 0, "dropped": 2}
    with pytest.raises(ValueError, match="drops them all"):
        fit_prompts(prompts[1:], limit, "drop", bos_token_id=1, where="here")


def long_prompts(path, count=6, words=300):
    path.write_text("".join(json.dumps({"prompt": " ".join(["the movie was great"] * (words // 4)) + f" {i}"}) + "\n"
                            for i in range(count)))
    return path


def test_prompts_longer_than_the_llama_twins_context_are_refused_at_load_with_how_many_and_the_fix(twin_dirs, tmp_path):
    prompts = long_prompts(tmp_path / "long.jsonl")
    config = load_config("configs/quickstart.yaml", [f"model.path={twin_dirs['llama']}", f"data.prompts={prompts}"])
    encoder = PromptEncoder(config, twin_dirs["llama"])
    with pytest.raises(ValueError, match=r"6 of 6 prompts are longer than 232 tokens \(the model's 256 positions minus "
                                         r"rollout.max_new_tokens = 24\); the longest has \d+"):
        encoder.encode([json.loads(line)["prompt"] for line in prompts.read_text().splitlines()], "train")


# ----- at start-up, through the driver -----


@pytest.mark.slow
def test_start_up_refuses_bad_inputs_before_any_actor_starts(twin_dirs, ray_session, tmp_path):
    from raylign.cluster.driver import train

    base = [f"output_dir={tmp_path}", f"model.path={twin_dirs['gpt2']}", "sft.steps=0", "rollout.backend=hf",
            "logging.progress=false"]
    with pytest.raises(ConfigError, match=r"data.chat_template = true, but the tokenizer .* has no chat template"):
        train(load_config("configs/quickstart.yaml", [*base, "data.chat_template=true"]))
    with pytest.raises(ConfigError, match=r"model.lora.target_modules = \['q_proj', 'v_proj'\]: .* GPT2LMHeadModel"):
        train(load_config("configs/quickstart.yaml", [*base, "model.lora.target_modules=[q_proj, v_proj]"]))
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family, backend, overflow, truncated", [
    ("llama", "vllm", "truncate_left", 6),  # 256 positions: cut to 256 - 16 tokens, vLLM reserves 256
    ("gpt2", "hf", "error", 0),  # 1024 positions: they fit as they are
])
def test_300_token_prompts_run_on_both_engines_truncated_or_as_they_are(family, backend, overflow, truncated,
                                                                         twin_dirs, ray_session, tmp_path):
    from raylign.cluster.driver import train

    prompts = long_prompts(tmp_path / "long.jsonl")
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.path={twin_dirs[family]}", f"data.prompts={prompts}", "sft.steps=0",
        f"rollout.backend={backend}", f"data.prompt_overflow={overflow}", "rollout.max_new_tokens=16",
        "rollout.samples_per_prompt=2", "train.prompts_per_step=3", "train.steps=2", "eval.every=0",
        "eval.run_test=false", "logging.progress=false",
    ])
    results = train(config)
    summary = results["prompts"]
    assert summary["splits"]["train"] == {"total": 6, "kept": 6, "truncated": truncated, "dropped": 0}
    if truncated:
        assert summary["longest_prompt"] == 240 and summary["max_model_len"] == 256
    else:
        assert summary["longest_prompt"] > 300 and summary["max_model_len"] == summary["longest_prompt"] + 16
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["data/truncated_prompts"] for m in metrics] == [3 if truncated else 0] * 2
    assert results["rollout_engine"]["backend"] == backend and results["logprob_gap_max"] < 1e-4


# ----- the transformers engine -----


def test_transformers_engine_batches_prompts_without_changing_any_prompts_samples_or_logprobs(twin_dirs):
    """Left-padded prompts of different lengths decode together; each prompt draws from its own seeded generator,
    and every logprob is the learner's for the same token (temperature and min-tokens mask applied)."""
    from raylign.actors.engines import HFEngine
    from raylign.common.types import PromptItem, Sample, SamplingSettings
    from raylign.learner.batching import build_token_batch, score_tokens

    torch.set_num_threads(1)
    engine = HFEngine(twin_dirs["gpt2"], max_batch_rows=64)
    texts = ["Honestly, the movie was", "Overall, the plot felt", "In my opinion, the cast of this film seemed", "I"]
    prompts = [PromptItem(index=i, text=t, token_ids=engine.tokenizer(t).input_ids, seed=100 + i) for i, t in enumerate(texts)]
    settings = SamplingSettings(samples_per_prompt=3, max_new_tokens=10, min_new_tokens=2, temperature=0.9)
    together = engine.generate(prompts, settings)
    for prompt, completions in zip(prompts, together):
        alone = engine.generate([prompt], settings)[0]
        assert [c.token_ids for c in alone] == [c.token_ids for c in completions]
    assert engine.generate(prompts[::-1], settings)[::-1][0][0].token_ids == together[0][0].token_ids
    samples = [Sample(prompt_index=i, sample_index=j, prompt=p.text, prompt_ids=p.token_ids, completion="",
                      completion_ids=c.token_ids, behaviour_logprobs=c.logprobs, policy_version=0, finish_reason=c.finish_reason)
               for i, (p, completions) in enumerate(zip(prompts, together)) for j, c in enumerate(completions)]
    batch = build_token_batch(samples, pad_token_id(engine.tokenizer))
    with torch.no_grad():
        learner = score_tokens(engine.model, batch, temperature=0.9, eos_token_id=engine.tokenizer.eos_token_id,
                               min_new_tokens=2).logprobs
    assert ((learner - batch.behaviour_logprobs).abs() * batch.completion_mask).max().item() < 1e-5
