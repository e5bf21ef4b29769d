"""Token log-probabilities of finished samples under a model and under a fixed reference model, for evaluation.

The learner's `reference_kl` compares a policy with its own disabled adapter; an evaluation compares arbitrary
models (a base model, an SFT model, a DPO adapter, RL adapters) with one named reference, so this actor loads
both. The policy's tokens are scored under the distribution they were sampled from (temperature, the
min-tokens EOS mask, top-k/top-p: `learner.batching.score_tokens`), which is what the rollout engines report as
behaviour logprobs, so their gap checks that the engine ran the model that is scored. The reference is scored
at the same temperature and EOS mask, without truncation (a sampled token outside the reference's nucleus would
otherwise have probability 0).
"""

from __future__ import annotations

import torch

from raylign.common.lora import adapter_files
from raylign.common.model_checks import load_tokenizer
from raylign.common.precision import DTYPES
from raylign.common.prompt_completion import pad_token_id
from raylign.common.storage import local_copy
from raylign.common.types import AdapterUpdate, Sample, SamplingSettings
from raylign.learner.batching import build_token_batch, score_tokens


class SequenceScorer:
    """Runs as a Ray actor (the evaluation wraps it with `ray.remote`); usable directly in tests."""

    def __init__(self, reference: str | None = None, reference_adapter: str | None = None, dtype: str = "float32",
                 device: str = "cpu", threads: int = 1, batch_size: int = 16, share_prompts: bool = True):
        torch.set_num_threads(threads)
        self.dtype, self.device, self.batch_size = DTYPES[dtype], torch.device(device), batch_size
        self.share_prompts = share_prompts
        self.reference = self.reference_vocab = None
        if reference is not None:
            self.reference, _ = self._load(reference, reference_adapter)
            self.reference_vocab = load_tokenizer(reference).get_vocab()
        self.policy = self.tokenizer = None

    def _load(self, base: str, adapter: str | None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(local_copy(base), dtype=self.dtype).to(self.device)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, local_copy(adapter))
        return model.eval(), adapter is not None

    def load_policy(self, base: str, adapter: str | None, version: int,
                    zero_like: str | None = None) -> AdapterUpdate | None:
        """Load the model to score next; returns what the rollout actors need to sample from it (its adapter, which
        an actor with weight_sync 'merged' merges itself), or None for a model without an adapter.

        `zero_like` (a model without an adapter only): an adapter directory whose shape to copy with B = 0, so
        engines already holding adapters of that shape sample the base model exactly (B @ A x adds exact zeros).
        """
        self.policy, has_adapter = self._load(base, adapter)
        if adapter is None and zero_like is not None:
            from peft import LoraConfig, get_peft_model

            shape = LoraConfig.from_pretrained(local_copy(zero_like))
            shape.init_lora_weights = True  # PEFT's default init: B = 0, so the adapter changes nothing
            self.policy, has_adapter = get_peft_model(self.policy, shape).eval(), True
        self.tokenizer = load_tokenizer(base)
        if self.reference_vocab is not None and self.tokenizer.get_vocab() != self.reference_vocab:
            raise ValueError(
                f"model '{base}' has another vocabulary than the reference; KL compares the same tokens under both "
                "models, so the reference must share the tokenizer (pick a reference of the same family, or reference: null)"
            )
        if not has_adapter:
            return None
        return AdapterUpdate(version=version, files=adapter_files(self.policy, version))

    @torch.no_grad()
    def score(self, samples: list[Sample], settings: SamplingSettings) -> list[dict[str, list[float] | None]]:
        """Per sample, the completion tokens' logprobs under the policy ('policy', its sampling distribution) and
        under the reference ('reference', None without one)."""
        if self.policy is None:
            raise RuntimeError("score called before load_policy")
        pad, eos = pad_token_id(self.tokenizer), self.tokenizer.eos_token_id
        scored = []
        for start in range(0, len(samples), self.batch_size):
            part = samples[start:start + self.batch_size]
            batch = build_token_batch(part, pad).to(self.device)
            options = {"temperature": settings.temperature, "eos_token_id": eos, "min_new_tokens": settings.min_new_tokens,
                       "share_prompts": self.share_prompts}
            policy = score_tokens(self.policy, batch, top_k=settings.top_k, top_p=settings.top_p, **options).logprobs
            reference = score_tokens(self.reference, batch, **options).logprobs if self.reference is not None else None
            mask = batch.completion_mask.bool()
            for row in range(len(part)):
                scored.append({
                    "policy": policy[row][mask[row]].double().tolist(),
                    "reference": reference[row][mask[row]].double().tolist() if reference is not None else None,
                })
        return scored
