"""The shared-prompt forward (each distinct prompt once, its completions on its key/value cache) against K full
sequences, on every family twin: the same logprobs, entropy, hidden states and LoRA gradients at every completion
position, with uneven prompts and completions, a prompt of one sample, and the engines' sampling settings."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from raylign.common.precision import DTYPES, attention_kernel, mixed_precision
from raylign.common.tiny_model import FAMILIES
from raylign.common.types import Sample
from raylign.learner.batching import build_token_batch, can_share_prompts, score_tokens, sliding_window

# Three prompts of 5, 2 and 7 tokens with 3, 1 and 2 samples; completions of 1 to 6 tokens.
PROMPTS = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33, 34, 35, 36, 37]]
GROUPS = [0, 0, 0, 1, 2, 2]
COMPLETIONS = [[41, 42, 43], [44], [45, 46, 47, 48, 49, 50], [51, 52], [53, 54, 55, 56], [57, 58, 59, 60, 61]]


def samples() -> list[Sample]:
    return [Sample(prompt_index=group, sample_index=i, prompt="", prompt_ids=PROMPTS[group], completion="",
                   completion_ids=completion, behaviour_logprobs=[0.0] * len(completion), policy_version=0,
                   finish_reason="length") for i, (group, completion) in enumerate(zip(GROUPS, COMPLETIONS))]


def policy_of(model_dir: str, dtype: str) -> torch.nn.Module:
    kernel = attention_kernel("auto", dtype, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], attn_implementation=kernel)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def scored(model, batch, share_prompts: bool, dtype: str):
    model.zero_grad()
    with mixed_precision(dtype, torch.device("cpu")):
        scores = score_tokens(model, batch, temperature=0.8, eos_token_id=2, min_new_tokens=2, top_k=50,
                              with_entropy=True, with_hidden=True, share_prompts=share_prompts)
    mask = batch.completion_mask
    loss = (scores.logprobs * mask).sum() + 0.1 * (scores.entropy * mask).sum() + (scores.hidden.float() * mask[..., None]).mean()
    loss.backward()
    gradients = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    at_completions = mask.bool()
    return scores.logprobs[at_completions], scores.entropy[at_completions], scores.hidden[at_completions], gradients


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_prompt_forward_equals_full_sequences_on_every_twin(family, twin_dirs):
    torch.manual_seed(0)
    model = policy_of(twin_dirs[family], "float32")
    batch = build_token_batch(samples(), pad_token_id=0)
    assert batch.prompt_group.tolist() == GROUPS and batch.prompt_lengths.tolist() == [5, 5, 5, 2, 7, 7]
    full = scored(model, batch, share_prompts=False, dtype="float32")
    shared = scored(model, batch, share_prompts=True, dtype="float32")
    for ours, theirs in zip(shared[:3], full[:3]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    relative_errors = [float((ours - theirs).norm() / theirs.norm()) for ours, theirs in zip(shared[3], full[3])]
    assert len(relative_errors) > 0 and max(relative_errors) < 1e-5


def test_shared_prompt_forward_in_bfloat16_agrees_within_its_rounding(twin_dirs):
    model = policy_of(twin_dirs["llama"], "bfloat16")
    batch = build_token_batch(samples(), pad_token_id=0)
    full_logprobs = scored(model, batch, share_prompts=False, dtype="bfloat16")[0].detach()
    shared_logprobs = scored(model, batch, share_prompts=True, dtype="bfloat16")[0].detach()
    assert float((shared_logprobs - full_logprobs).abs().mean()) < 1e-2


def test_rows_of_distinct_prompts_take_the_full_forward(twin_dirs):
    """Nothing to share: one forward of the whole sequences (the prompt positions keep their logprobs)."""
    model = policy_of(twin_dirs["llama"], "float32")
    batch = build_token_batch([samples()[i] for i in (0, 3, 4)], pad_token_id=0)
    with torch.no_grad():
        logprobs = score_tokens(model, batch).logprobs
    assert bool((logprobs[0, :4] != 0).all())  # prompt positions scored


def test_a_sliding_window_shorter_than_the_shared_cache_takes_the_full_forward(twin_dirs):
    """The shared cache holds padding after shorter prompts, and a sliding window counts cache slots: with a
    window of 6 the shared forward was off by 0.18 nats, so such a batch takes the full forward."""
    config = AutoConfig.from_pretrained(twin_dirs["qwen2"])
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 6, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert sliding_window(model) == 6
    assert sliding_window(AutoModelForCausalLM.from_pretrained(twin_dirs["qwen2"])) is None  # use_sliding_window off
    batch = build_token_batch(samples(), pad_token_id=0)
    mask = batch.completion_mask.bool()
    with torch.no_grad():
        full = score_tokens(model, batch, share_prompts=False).logprobs
        shared = score_tokens(model, batch).logprobs
    torch.testing.assert_close(shared[mask], full[mask])


class PositionsByKeywords(torch.nn.Module):
    """A model whose forward takes position ids only through **kwargs (as MPT's, whose ALiBi ignores them)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, past_key_values=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)


class DropsTheCache(PositionsByKeywords):
    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                output_hidden_states=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)


def test_a_model_that_cannot_place_completions_on_a_cached_prompt_takes_the_full_forward_or_stops(twin_dirs):
    inner = AutoModelForCausalLM.from_pretrained(twin_dirs["llama"]).eval()
    assert can_share_prompts(inner) and can_share_prompts(policy_of(twin_dirs["llama"], "float32"))
    batch = build_token_batch(samples(), pad_token_id=0)
    with torch.no_grad():
        full = score_tokens(inner, batch, share_prompts=False).logprobs
        swallowed = PositionsByKeywords(inner)
        assert not can_share_prompts(swallowed)
        torch.testing.assert_close(score_tokens(swallowed, batch).logprobs, full)  # the full forward, prompts included
        with pytest.raises(RuntimeError, match="shared_prompt_forward=false"):
            score_tokens(DropsTheCache(inner), batch)
