"""The processed distribution the rollout engines sample from: temperature, the min-tokens EOS mask, top-k/top-p.

vLLM (with `logprobs_mode="processed_logprobs"`) reports logprobs of exactly this distribution; the
transformers engine samples from it too, so both engines give the learner the same numbers to match.
"""

from __future__ import annotations

import torch


def truncate_logits(logits: torch.Tensor, top_k: int = -1, top_p: float = 1.0,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [..., V] with every token outside the top-k / top-p set at -inf, the rule vLLM's and
    transformers' samplers apply after temperature: top-k keeps every token >= the k-th largest logit
    (ties kept); top-p then sorts ascending, and drops a token while the cumulative probability up to and
    including it is <= 1 - top_p (the most likely token always stays).

    `keep` [...] (token ids) are never dropped: a sampled token that sits exactly on the boundary, where
    the engine's and the learner's float rounding can disagree, keeps a finite logprob.
    """
    if top_k <= 0 and top_p >= 1.0:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    dropped = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if 0 < top_k < vocab:
        dropped = sorted_logits < sorted_logits[..., vocab - top_k: vocab - top_k + 1]
    if top_p < 1.0:
        cumulative = sorted_logits.masked_fill(dropped, float("-inf")).softmax(dim=-1).cumsum(dim=-1)
        dropped = dropped | (cumulative <= 1 - top_p)
        dropped[..., -1] = False
    removed = torch.zeros_like(dropped).scatter(-1, order, dropped)
    if keep is not None:
        removed = removed.scatter(-1, keep.unsqueeze(-1), False)
    return logits.masked_fill(removed, float("-inf"))


def processed_logprobs(logits: torch.Tensor, *, temperature: float, step: int, min_new_tokens: int,
                       eos_token_id: int | None, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Log-probabilities [B, V] of the next token at generation step `step` (0-based), from raw logits [B, V]."""
    logits = logits.float() / temperature
    if step < min_new_tokens and eos_token_id is not None:
        logits[:, eos_token_id] = float("-inf")
    return torch.log_softmax(truncate_logits(logits, top_k, top_p), dim=-1)
