"""Policy-gradient objectives composed from the pure functions in `algorithms`.

Shapes: per-token tensors [B, T] with a completion `mask`; sequence tensors [B];
groups of K samples are contiguous.
"""

from __future__ import annotations

import torch

from raylign.learner import algorithms as alg


def sequence_advantages(method: str, scores: torch.Tensor, group_sizes: int | list[int], *, advantage_scale: str = "std",
                        baseline: float | None = None) -> torch.Tensor:
    """Advantages [B] for the sequence-level methods.

    grpo: group-relative (r - mean_g) / std_g (or mean-only); rloo: r minus the
    mean of the other samples of its group; reinforce: r minus an EMA baseline
    (0 before the first update). `group_sizes` is one size for equal groups or
    a list when groups differ (invalid samples removed); a group of one has no
    comparison and gets advantage 0 under grpo and rloo.
    """
    if method in ("grpo", "rloo"):
        sizes = [group_sizes] * (len(scores) // group_sizes) if isinstance(group_sizes, int) else group_sizes
        if len(set(sizes)) == 1 and sizes[0] > 1:
            return _group_relative(method, scores, sizes[0], advantage_scale)
        parts = [
            _group_relative(method, group, len(group), advantage_scale) if len(group) > 1 else torch.zeros_like(group)
            for group in torch.split(scores, sizes)
        ]
        return torch.cat(parts)
    if method == "reinforce":
        return scores - (baseline if baseline is not None else 0.0)
    raise ValueError(f"algorithm.name = '{method}' has no sequence-level advantage; use grpo, rloo or reinforce")


def policy_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float | None,
    kl_coef_in_loss: float,
    kl_estimator: str,
    aggregation: str,
    max_new_tokens: int,
    importance_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + kl_coef_in_loss * KL(policy || reference) - entropy_coef * entropy.

    `advantages` is [B] (sequence methods) or [B, T] (PPO with GAE). With
    kl_coef_in_loss = 0 the KL is still measured for logging.
    """
    policy_per_token, clipped = alg.clipped_surrogate_loss(logp, old_logp, advantages, clip_low, clip_high, importance_weights)
    kl = alg.kl_per_token(logp, ref_logp, kl_estimator)
    per_token = policy_per_token + kl_coef_in_loss * kl
    if entropy is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    loss = alg.aggregate_loss(per_token, mask, aggregation, constant=max_new_tokens)
    stats = {
        "policy_loss": alg.aggregate_loss(policy_per_token, mask, aggregation, constant=max_new_tokens).detach(),
        "kl": alg.masked_mean(kl, mask).detach(),
        "clip_fraction": alg.masked_mean(clipped.float(), mask).detach(),
        "approx_kl": alg.masked_mean(0.5 * (logp - old_logp) ** 2, mask).detach(),
    }
    return loss, stats


def _group_relative(method: str, scores: torch.Tensor, group_size: int, advantage_scale: str) -> torch.Tensor:
    if method == "grpo":
        return alg.group_advantages(scores, group_size, scale=advantage_scale)
    return alg.rloo_advantages(scores, group_size)
