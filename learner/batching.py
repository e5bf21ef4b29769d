"""Turn samples into padded tensors and score their tokens under a model.

Positions follow the next-token convention: column j of a [B, L-1] tensor is
the log-probability of token j+1 given tokens 0..j, so policy, reference and
behaviour log-probabilities line up on exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylign.common.sampling import truncate_logits
from raylign.common.types import Sample


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor  # [B, L-1] 1 where the target token is a completion token
    completion_index: torch.Tensor  # [B, L-1] 0-based index of the target token within its completion (-1 elsewhere)
    behaviour_logprobs: torch.Tensor  # [B, L-1] rollout logprobs at completion positions, 0 elsewhere

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def select(self, rows: slice | torch.Tensor) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def build_token_batch(samples: list[Sample], pad_token_id: int) -> TokenBatch:
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    width = max(lengths)
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    completion_mask = torch.zeros((batch, width - 1), dtype=torch.float32)
    completion_index = torch.full((batch, width - 1), -1, dtype=torch.long)
    behaviour = torch.zeros((batch, width - 1), dtype=torch.float32)
    for row, sample in enumerate(samples):
        if len(sample.behaviour_logprobs) != len(sample.completion_ids):
            raise ValueError(
                f"sample (prompt {sample.prompt_index}, #{sample.sample_index}) has {len(sample.completion_ids)} tokens "
                f"but {len(sample.behaviour_logprobs)} behaviour logprobs"
            )
        prompt_len, completion_len = len(sample.prompt_ids), len(sample.completion_ids)
        input_ids[row, : lengths[row]] = torch.tensor(sample.prompt_ids + sample.completion_ids)
        attention_mask[row, : lengths[row]] = 1
        span = slice(prompt_len - 1, prompt_len - 1 + completion_len)
        completion_mask[row, span] = 1.0
        completion_index[row, span] = torch.arange(completion_len)
        behaviour[row, span] = torch.tensor(sample.behaviour_logprobs)
    return TokenBatch(input_ids, attention_mask, completion_mask, completion_index, behaviour)


@dataclass
class TokenScores:
    logprobs: torch.Tensor  # [B, L-1]
    entropy: torch.Tensor | None  # [B, L-1], differentiable
    hidden: torch.Tensor | None  # [B, L-1, H] last hidden state of each context (for value heads)


def score_tokens(
    model,
    batch: TokenBatch,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    min_new_tokens: int = 0,
    with_entropy: bool = False,
    with_hidden: bool = False,
    top_k: int = -1,
    top_p: float = 1.0,
) -> TokenScores:
    """Log-probabilities [B, L-1] of each next token under the sampling distribution.

    Applies the same temperature, min-new-tokens EOS mask and top-k / top-p truncation (renormalised over
    the kept set) the rollout engines sample with, so the numbers are comparable with behaviour logprobs.
    Truncation applies at completion positions only; prompt positions keep the full distribution.
    """
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=with_hidden)
    logits = output.logits[:, :-1].float() / temperature
    if min_new_tokens > 0 and eos_token_id is not None:
        too_early = (batch.completion_index >= 0) & (batch.completion_index < min_new_tokens)
        logits[..., eos_token_id] = logits[..., eos_token_id].masked_fill(too_early, float("-inf"))
    targets = batch.input_ids[:, 1:]
    if top_k > 0 or top_p < 1.0:
        completion = (batch.completion_index >= 0).unsqueeze(-1)
        logits = torch.where(completion, truncate_logits(logits, top_k, top_p, keep=targets), logits)
    normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    entropy = None
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = normaliser - (probs * logits.masked_fill(probs == 0, 0.0)).sum(-1)
    hidden = output.hidden_states[-1][:, :-1] if with_hidden else None
    return TokenScores(logprobs, entropy, hidden)
