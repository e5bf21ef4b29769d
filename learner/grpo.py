"""GRPO's per-batch loss, composed from the pure functions in `algorithms`."""

from __future__ import annotations

import torch

from raylign.learner import algorithms as alg


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float | None,
    kl_coef: float,
    kl_estimator: str,
    aggregation: str,
    max_new_tokens: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate with sequence advantages plus beta * KL(policy || reference) in the loss.

    Shapes: per-token tensors [B, T], `advantages` [B]. Returns the scalar loss
    and detached statistics.
    """
    policy_per_token, clipped = alg.clipped_surrogate_loss(logp, old_logp, advantages, clip_low, clip_high)
    kl = alg.kl_per_token(logp, ref_logp, kl_estimator)
    per_token = policy_per_token + kl_coef * kl
    loss = alg.aggregate_loss(per_token, mask, aggregation, constant=max_new_tokens)
    stats = {
        "policy_loss": alg.aggregate_loss(policy_per_token, mask, aggregation, constant=max_new_tokens).detach(),
        "kl": alg.masked_mean(kl, mask).detach(),
        "clip_fraction": alg.masked_mean(clipped.float(), mask).detach(),
        "approx_kl": alg.masked_mean(0.5 * (logp - old_logp) ** 2, mask).detach(),
    }
    return loss, stats
