"""Advantage estimators, policy/value losses, KL estimators and KL controllers.

Pure functions on torch tensors: no Ray, no models, no I/O.

Conventions:
- per-token tensors are [B, T]; ``mask`` is [B, T], float or bool,
  1 = completion token, 0 = padding;
- sequence-level tensors are [B];
- groups are contiguous: samples ``i*K .. i*K+K-1`` answer prompt ``i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch
from torch import Tensor

# exp() of a log-ratio beyond this overflows float32 and turns a masked-out
# position into inf * 0 = NaN in the backward pass; a ratio of e^20 means the
# policy has already diverged, so clamping loses nothing useful.
_MAX_LOG_RATIO = 20.0


def _weights(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(dtype=like.dtype, device=like.device)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) over ``dim`` (all elements when None).

    Padded positions are replaced by 0 before multiplying, so inf/NaN there
    (e.g. log-probs of pad tokens) cannot leak into the sum.
    """
    w = _weights(mask, x)
    values = torch.where(w != 0, x * w, torch.zeros_like(x))
    return values.sum() if dim is None else values.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over ``dim`` (all elements when None).

    An empty mask gives 0 rather than NaN, so one empty completion does not
    poison a whole batch.
    """
    total = masked_sum(x, mask, dim)
    count = masked_sum(torch.ones_like(x), mask, dim)
    # total is exactly 0 wherever count is 0, so the clamp turns 0/0 into 0.
    return total / count.clamp_min(torch.finfo(x.dtype).tiny)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the valid tokens of the whole batch.

    Mean and variance are taken over ``mask`` only; the variance is the
    biased (population) one. With ``shift_mean=False`` the mean is added back,
    so only the scale changes. Padded positions come out as 0. Shape of ``x``.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_weights(mask, x) != 0, whitened, torch.zeros_like(x))


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"batch size {rewards.numel()} is not divisible by group_size={group_size}: "
            f"each prompt needs exactly group_size samples; make the rollout batch a multiple of group_size"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: Literal["std", "none"] = "std",
    eps: float = 1e-6,
    std: Literal["population", "unbiased"] = "population",
) -> Tensor:
    """GRPO advantages: A_i = (r_i - mean_g) / (std_g + eps), or r_i - mean_g.

    ``rewards`` [B] with contiguous groups of ``group_size``; returns [B].
    ``scale="none"`` drops the division (Dr.GRPO), which removes the bias
    towards groups whose rewards barely differ.

    ``std="population"`` divides the variance by K (raylign's default, defined
    for K=1 where it gives A=0); ``"unbiased"`` divides by K-1 as TRL and veRL
    do, which makes the advantages smaller by sqrt((K-1)/K) (x0.866 at K=4).
    """
    grouped = _grouped(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if std not in ("population", "unbiased"):
        raise ValueError(f"std must be 'population' or 'unbiased', got {std!r}")
    if scale == "std":
        unbiased = std == "unbiased" and group_size > 1
        centred = centred / (grouped.std(dim=1, unbiased=unbiased, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    return centred.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out: A_i = r_i - (sum_g - r_i) / (K - 1).

    ``rewards`` [B] with contiguous groups of ``group_size`` (K >= 2); returns [B].
    Equals K/(K-1) * (r_i - mean_g).
    """
    grouped = _grouped(rewards, group_size)
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2 for a leave-one-out baseline, got {group_size}")
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def ema_update(running: float | None, value: float, momentum: float) -> float:
    """Exponential moving average: m * running + (1 - m) * value.

    The first call (``running`` is None) returns ``value`` so the average
    does not start biased towards 0.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if running is None:
        return float(value)
    return momentum * running + (1.0 - momentum) * float(value)


def clip_advantages(adv: Tensor, limit: float | None) -> Tensor:
    """clamp(adv, -limit, limit); unchanged when ``limit`` is None. Any shape."""
    if limit is None:
        return adv
    if limit <= 0:
        raise ValueError(f"advantage clip limit must be > 0 or None (no clipping), got {limit}")
    return adv.clamp(-limit, limit)


def kl_per_token(
    logp: Tensor,
    ref_logp: Tensor,
    estimator: Literal["k1", "k2", "k3"],
) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi.

    With log_ratio = logp - ref_logp (Schulman, "Approximating KL divergence"):
      k1 = log_ratio                            unbiased, high variance, can be < 0
      k2 = 0.5 * log_ratio^2                    biased, low variance, >= 0
      k3 = exp(-log_ratio) + log_ratio - 1      unbiased, low variance, >= 0
    For k3, -log_ratio is capped at 20 before exp so a token the policy has
    all but abandoned cannot overflow. Inputs and output are [B, T].

    As a loss term on sampled tokens (GRPO style) the value matters less than
    the gradient it gives: k1's is grad log pi, zero in expectation (no
    regularisation at all, so the config refuses k1 in the loss); k2's is the
    gradient of KL(pi || ref); k3's is the gradient of KL(ref || pi).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        neg = (-log_ratio).clamp(max=_MAX_LOG_RATIO)
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"KL estimator must be one of 'k1', 'k2', 'k3', got {estimator!r}")


def clipped_surrogate_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float | None = None,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO clipped objective, per token.

    ratio = exp(logp - old_logp)
    loss  = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) [* w]

    ``logp``, ``old_logp``: [B, T]. ``advantages``: [B] (one per sequence,
    broadcast over T) or [B, T]. ``clip_high`` defaults to ``clip_low``; a
    larger value ("clip-higher", DAPO) lets unlikely tokens with A > 0 grow
    further. ``importance_weights`` [B, T] multiply the loss as a truncated
    importance-sampling correction for rollouts from a stale behaviour
    policy; they are detached here so no gradient flows through them.

    Returns (per_token_loss [B, T], clipped [B, T] bool: where the clipped
    branch was strictly active, i.e. the token got no gradient).
    """
    if clip_high is None:
        clip_high = clip_low
    if clip_low <= 0 or clip_high <= 0:
        raise ValueError(f"clip_low and clip_high must be > 0, got clip_low={clip_low}, clip_high={clip_high}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    clipped_loss = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = torch.maximum(unclipped, clipped_loss)
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach()
    return per_token, clipped_loss > unclipped


@torch.no_grad()
def truncated_importance_weights(learner_logp: Tensor, behaviour_logp: Tensor, cap: float) -> Tensor:
    """w = min(exp(learner_logp - behaviour_logp), cap), detached. [B, T].

    Corrects for the rollout engine sampling with slightly different numerics
    or older weights than the learner; the cap bounds the variance.
    """
    if cap <= 0:
        raise ValueError(f"importance weight cap must be > 0, got {cap}")
    log_ratio = (learner_logp - behaviour_logp).clamp(max=_MAX_LOG_RATIO)
    return torch.exp(log_ratio).clamp(max=cap)


@dataclass(frozen=True)
class Normaliser:
    """The counts a loss is divided by, taken over a whole minibatch.

    Micro-batches and data-parallel ranks only split the work of a minibatch:
    each part divides its *sum* by these counts, so the parts add up to exactly
    the minibatch's loss (a mean of per-part means would weight a short part
    like a long one).
    """

    tokens: float  # valid (completion) tokens in the minibatch
    sequences: int  # rows in the minibatch

    @classmethod
    def of(cls, mask: Tensor) -> "Normaliser":
        return cls(tokens=float(mask.sum()), sequences=int(mask.shape[0]))


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: Literal["token_mean", "seq_mean_token_mean", "constant"],
    constant: float | None = None,
    normaliser: Normaliser | None = None,
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar over the valid tokens.

    token_mean:           sum(loss * mask) / N_tokens; every token weighs the same.
    seq_mean_token_mean:  sum_b [ sum_t(loss * mask) / sum_t(mask) ] / N_seqs; every
                          sequence weighs the same (a sequence with no valid
                          token contributes 0 but still counts).
    constant:             sum(loss * mask) / (N_seqs * constant) (Dr.GRPO), with
                          constant = max completion length, so the gradient
                          does not favour short or long answers.

    N_tokens and N_seqs come from ``normaliser`` (the whole minibatch, when
    ``per_token`` is one micro-batch of it) or, when None, from ``mask`` itself.
    """
    normaliser = normaliser or Normaliser.of(mask)
    if mode == "token_mean":
        return masked_sum(per_token, mask) / max(normaliser.tokens, 1.0)
    if mode == "seq_mean_token_mean":
        return masked_mean(per_token, mask, dim=-1).sum() / max(normaliser.sequences, 1)
    if mode == "constant":
        if constant is None or constant <= 0:
            raise ValueError(
                f"loss aggregation 'constant' needs constant > 0 (the max completion length), got {constant}; "
                f"pass constant=max_new_tokens"
            )
        return masked_sum(per_token, mask) / (max(normaliser.sequences, 1) * constant)
    raise ValueError(
        f"loss aggregation mode must be 'token_mean', 'seq_mean_token_mean' or 'constant', got {mode!r}"
    )


@torch.no_grad()
def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the valid tokens of each row.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    with V and A after the last valid token equal to 0. Returns
    (advantages [B, T], returns = A + V [B, T]), both 0 at padding and detached.

    Padding positions are skipped (t+1 means the next valid token), so the
    result is the same for left, right or no padding.
    """
    valid = mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        m = valid[:, t]
        advantages[:, t] = torch.where(m, adv_t, torch.zeros_like(adv_t))
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def eos_rewards_with_kl(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """PPO token rewards: r_t = -kl_coef * kl_t, plus ``scores[b]`` at the last valid token.

    ``scores`` [B], ``kl`` [B, T] (typically k1), ``mask`` [B, T]; returns [B, T],
    0 at padding.
    """
    valid = mask.bool()
    if not valid.any(dim=1).all():
        empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no valid token in mask, so their score has nowhere to go")
    positions = torch.arange(1, kl.shape[1] + 1, device=kl.device)
    last = (valid * positions).argmax(dim=1)
    penalty = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    at_last = torch.nn.functional.one_hot(last, kl.shape[1]).to(kl.dtype)
    return penalty + at_last * scores.to(kl.dtype).unsqueeze(-1)


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float,
) -> Tensor:
    """0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -clip, clip).

    All inputs [B, T]; returns the per-token loss [B, T], 0 at padding
    (reduce it with ``aggregate_loss``).
    """
    if clip <= 0:
        raise ValueError(f"value clip must be > 0, got {clip}")
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return torch.where(_weights(mask, loss) != 0, loss, torch.zeros_like(loss))


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v * z_v over the last axis. [B, T, V] -> [B, T].

    Logits of -inf (a masked vocabulary) have probability 0 and contribute 0;
    they are zeroed before the product because 0 * -inf is NaN.
    """
    probs = torch.softmax(logits, dim=-1)
    finite = torch.where(torch.isneginf(logits), torch.zeros_like(logits), logits)
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(dim=-1)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the valid tokens (population variances).

    1 = perfect critic, 0 = no better than a constant, < 0 = worse.
    NaN when the returns have zero variance (nothing to explain).
    """
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    if var_returns.item() == 0:
        return math.nan
    return float(1.0 - var_residual / var_returns)


class KLController(Protocol):
    """The coefficient of the KL penalty; the driver calls ``update`` once per learner step."""

    @property
    def value(self) -> float: ...

    def update(self, observed_kl: float, n_steps: int) -> None: ...


class FixedKLController:
    """A constant coefficient; ``update`` does nothing."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, observed_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019) proportional controller steering the KL towards ``target``.

    err = clip(observed_kl / target - 1, -0.2, 0.2);  coef *= 1 + err * n_steps / horizon.
    ``n_steps`` and ``horizon`` share a unit (samples in the paper and TRL):
    the coefficient moves by at most 20% per ``horizon``.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if init_coef <= 0:
            raise ValueError(f"adaptive KL init_coef must be > 0 (it is scaled multiplicatively), got {init_coef}")
        if target <= 0:
            raise ValueError(f"adaptive KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, observed_kl: float, n_steps: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class PhasedKLController:
    """Piecewise-constant coefficient: ``schedule`` = [(start_step, coef), ...].

    ``value_at(step)`` is the coef of the last phase with start_step <= step.
    ``update(observed_kl, n_steps)`` advances an internal step counter by
    ``n_steps`` (the KL itself is ignored) so the driver can treat all
    controllers alike; ``value`` is ``value_at(step)``. The first phase must
    start at 0 and start steps must increase strictly.
    """

    def __init__(self, schedule: Sequence[tuple[int, float]]):
        if not schedule:
            raise ValueError("phased KL schedule is empty; give at least [(0, coef)]")
        starts = [start for start, _ in schedule]
        if starts[0] != 0:
            raise ValueError(f"phased KL schedule must start at step 0, got first start_step={starts[0]}")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"phased KL schedule start steps must increase strictly, got {starts}")
        if any(coef < 0 for _, coef in schedule):
            raise ValueError(f"phased KL coefficients must be >= 0, got {[c for _, c in schedule]}")
        self.schedule = [(int(start), float(coef)) for start, coef in schedule]
        self.step = 0

    def value_at(self, step: int) -> float:
        coef = self.schedule[0][1]
        for start, phase_coef in self.schedule:
            if start > step:
                break
            coef = phase_coef
        return coef

    @property
    def value(self) -> float:
        return self.value_at(self.step)

    def update(self, observed_kl: float, n_steps: int) -> None:
        self.step += n_steps


def make_kl_controller(
    kind: Literal["fixed", "adaptive", "phased"],
    *,
    coef: float | None = None,
    target: float | None = None,
    horizon: float | None = None,
    schedule: Sequence[tuple[int, float]] | None = None,
) -> FixedKLController | AdaptiveKLController | PhasedKLController:
    """Build a KL controller. fixed: ``coef``; adaptive: ``coef`` (initial),
    ``target``, ``horizon``; phased: ``schedule``."""
    if kind == "fixed":
        if coef is None:
            raise ValueError("KL controller 'fixed' needs coef")
        return FixedKLController(coef)
    if kind == "adaptive":
        missing = [name for name, v in (("coef", coef), ("target", target), ("horizon", horizon)) if v is None]
        if missing:
            raise ValueError(f"KL controller 'adaptive' needs {', '.join(missing)}")
        return AdaptiveKLController(coef, target, horizon)
    if kind == "phased":
        if schedule is None:
            raise ValueError("KL controller 'phased' needs schedule, e.g. [(0, 0.05), (200, 0.02)]")
        return PhasedKLController(schedule)
    raise ValueError(f"KL controller kind must be 'fixed', 'adaptive' or 'phased', got {kind!r}")
