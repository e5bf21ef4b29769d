"""One policy-gradient update (PPO, GRPO, REINFORCE, RLOO), readable top to bottom.

    targets = prepare_targets(policy, batch, scores, group_sizes, algo, kl_coef=beta, baseline=b)
    metrics = run_update(policy, targets, algo, micro_batch_size=m, optimizer_step=step, shuffle=rng)

`prepare_targets` fixes what the update holds constant: the old policy's logprobs (for the ratio and the
sync guard), the reference's logprobs, PPO's old values, the advantages and returns. `run_update` then
makes `epochs` passes of `num_minibatches` optimizer steps.

Micro-batches only split the work of a minibatch. Every loss term of a micro-batch is a *sum* divided by
counts over the whole minibatch (`algorithms.Normaliser`: tokens for token means, sequences for sequence
means), so the accumulated gradient is the minibatch's gradient whatever `micro_batch_size` is.
Data-parallel ranks split the work the same way: each holds its rows of the batch, `ranks` gathers what
couples rows (group advantages, PPO's whitening) and sums the gradients (learner/data_parallel.py).

With one epoch and one minibatch, and when the advantages do not depend on the policy's logprobs (not
PPO, KL not in the reward), the weights that score the training forward are the weights that sampled the
batch, so the old logprobs are that forward's own (detached) logprobs: no extra pass, and the sync guard
stays exact. With no KL term on (`needs_reference`), the reference forward is skipped as well, and the
run logs no KL.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from raylign.common.config import AlgorithmConfig
from raylign.learner import algorithms as alg
from raylign.learner.batching import TokenBatch, TokenScores, score_tokens
from raylign.learner.data_parallel import SINGLE, Ranks

CRITIC_ADAPTER = "critic"


@dataclass
class ScoringPolicy:
    """The PEFT policy as the update sees it: how tokens are scored and where values come from.

    `critic` is 'value_head' (the value head reads the policy's last hidden state) or 'separate_adapter'
    (it reads the hidden state of the same base under the critic LoRA adapter). The reference policy is
    the same model with every adapter disabled.
    """

    model: torch.nn.Module
    value_head: torch.nn.Module
    trainable_parameters: list[torch.nn.Parameter]
    temperature: float
    eos_token_id: int | None
    min_new_tokens: int
    critic: str = "value_head"
    top_k: int = -1
    top_p: float = 1.0
    share_prompts: bool = True  # each distinct prompt runs once (learner.batching.score_tokens)

    def score(self, batch: TokenBatch, *, with_entropy: bool = False, with_values: bool = False,
              temperature: float | None = None, truncate: bool = True) -> tuple[TokenScores, torch.Tensor | None]:
        """Logprobs under the sampling distribution (temperature, min-token EOS mask and, with `truncate`,
        the engines' top-k / top-p), plus values when asked."""
        separate_critic = with_values and self.critic == "separate_adapter"
        scores = score_tokens(
            self.model, batch, temperature=temperature or self.temperature, eos_token_id=self.eos_token_id,
            min_new_tokens=self.min_new_tokens, with_entropy=with_entropy,
            with_hidden=with_values and not separate_critic,
            top_k=self.top_k if truncate else -1, top_p=self.top_p if truncate else 1.0,
            share_prompts=self.share_prompts,
        )
        if not with_values:
            return scores, None
        hidden = scores.hidden
        if separate_critic:
            with self.active_adapter(CRITIC_ADAPTER):
                output = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
            hidden = output.hidden_states[-1][:, :-1]
        return scores, self.value_head(hidden.float()).squeeze(-1)

    def reference_score(self, batch: TokenBatch, temperature: float | None = None) -> TokenScores:
        """The reference's full (untruncated) distribution: KL(truncated policy || reference) stays finite."""
        with torch.no_grad(), self.model.disable_adapter():
            return self.score(batch, temperature=temperature, truncate=False)[0]

    @contextlib.contextmanager
    def active_adapter(self, name: str):
        """Run the model with adapter `name`; every LoRA parameter keeps requires_grad, so one
        backward reaches both the policy and the critic adapter (PEFT's set_adapter would freeze the other)."""
        self.model.set_adapter(name)
        for parameter in self.trainable_parameters:
            parameter.requires_grad_(True)
        try:
            yield
        finally:
            self.model.set_adapter("default")
            for parameter in self.trainable_parameters:
                parameter.requires_grad_(True)


@dataclass
class UpdateTargets:
    """What stays fixed while a batch is optimised: computed once under the weights that sampled it.

    When `old_from_training_forward` is set, `old_logp`, `entropy`, `sequence_kl` and `importance` are
    filled in by the (single) training forward itself; read them after `run_update`.
    """

    batch: TokenBatch
    old_logp: torch.Tensor
    entropy: torch.Tensor
    ref_logp: torch.Tensor | None  # None when no KL term is on (needs_reference)
    old_values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None
    importance: torch.Tensor | None
    sequence_kl: torch.Tensor
    kl_coef: float
    old_from_training_forward: bool = False
    rows: torch.Tensor | None = None  # the rows of the whole batch these are (all of them on a learner alone)

    def __post_init__(self):
        if self.rows is None:
            self.rows = torch.arange(self.batch.input_ids.shape[0])


# ----- advantages -----


def sequence_advantages(method: str, scores: torch.Tensor, group_sizes: int | list[int], *, advantage_scale: str = "std",
                        advantage_std: str = "population", single_sample_groups: str = "zero",
                        baseline: float | None = None) -> torch.Tensor:
    """Advantages [B] for the sequence-level methods.

    grpo: group-relative (r - mean_g) / std_g (population or unbiased std), or mean-only; rloo: r minus
    the mean of the other samples of its group; reinforce: r minus the EMA `baseline`, which before the
    first update (None) is this batch's mean reward. `group_sizes` is one size for equal groups or a list
    when groups differ (invalid samples removed). A group of one has nothing to compare with: under grpo
    and rloo its advantage is 0 (`single_sample_groups='zero'`) or its raw score ('score', as veRL).
    """
    if method in ("grpo", "rloo"):
        sizes = [group_sizes] * (len(scores) // group_sizes) if isinstance(group_sizes, int) else group_sizes
        if len(set(sizes)) == 1 and sizes[0] > 1:
            return _group_relative(method, scores, sizes[0], advantage_scale, advantage_std)
        lonely = torch.zeros_like if single_sample_groups == "zero" else torch.clone
        parts = [
            _group_relative(method, group, len(group), advantage_scale, advantage_std) if len(group) > 1 else lonely(group)
            for group in torch.split(scores, sizes)
        ]
        return torch.cat(parts)
    if method == "reinforce":
        return scores - (baseline if baseline is not None else scores.mean())
    raise ValueError(f"algorithm.name = '{method}' has no sequence-level advantage; use grpo, rloo or reinforce")


def _group_relative(method: str, scores: torch.Tensor, group_size: int, advantage_scale: str, advantage_std: str) -> torch.Tensor:
    if method == "grpo":
        return alg.group_advantages(scores, group_size, scale=advantage_scale, std=advantage_std)
    return alg.rloo_advantages(scores, group_size)


def needs_reference(algo: AlgorithmConfig) -> bool:
    """Whether any KL term can be on: a coefficient that is 0 and stays 0 (fixed, or adaptive, which only
    scales it) makes the reference forward and the KL metrics pointless, so both are skipped."""
    if algo.kl_controller == "phased":
        return any(coef > 0 for _, coef in algo.kl_schedule)
    return algo.kl_coef > 0


def needs_old_pass(algo: AlgorithmConfig) -> bool:
    """Whether the old logprobs need their own forward before the update (see the module docstring)."""
    kl_in_reward = algo.kl_in_reward and needs_reference(algo)
    return algo.name == "ppo" or kl_in_reward or algo.epochs > 1 or algo.num_minibatches > 1


@torch.no_grad()
def prepare_targets(policy: ScoringPolicy, batch: TokenBatch, scores: torch.Tensor, group_sizes: list[int],
                    algo: AlgorithmConfig, *, kl_coef: float, baseline: float | None,
                    rows: torch.Tensor | None = None, ranks: Ranks = SINGLE) -> UpdateTargets:
    """Old and reference logprobs, values, advantages and returns for one batch of prompt groups.

    `batch` holds this rank's rows `rows` of the whole batch (all of it on a learner alone); `scores` and
    `group_sizes` describe the whole batch, so group-relative advantages see every sample of a group.
    """
    mask, is_ppo = batch.completion_mask, algo.name == "ppo"
    rows = torch.arange(len(scores)) if rows is None else rows
    local_scores = scores[rows.to(scores.device)]
    ref_logp = policy.reference_score(batch).logprobs if needs_reference(algo) else None
    token_zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if needs_old_pass(algo):
        old, old_values = policy.score(batch, with_entropy=True, with_values=is_ppo)
        old_logp, entropy = old.logprobs, old.entropy
        sequence_kl = (alg.masked_sum(alg.kl_per_token(old_logp, ref_logp, "k1"), mask, dim=-1)
                       if ref_logp is not None else torch.zeros_like(local_scores))
        importance = (alg.truncated_importance_weights(old_logp, batch.behaviour_logprobs, algo.importance_sampling_cap)
                      if algo.importance_sampling_cap is not None else None)
    else:
        old_values = None
        old_logp, entropy = token_zeros.clone(), token_zeros.clone()
        sequence_kl = torch.zeros_like(local_scores)
        importance = torch.ones_like(token_zeros) if algo.importance_sampling_cap is not None else None
    returns = None
    if is_ppo:
        kl_k1 = alg.kl_per_token(old_logp, ref_logp, "k1") if ref_logp is not None else token_zeros
        token_rewards = alg.eos_rewards_with_kl(local_scores, kl_k1, mask, kl_coef if algo.kl_in_reward else 0.0)
        advantages, returns = alg.gae(token_rewards, old_values, mask, algo.gamma, algo.lam)
        advantages = whiten_across_ranks(advantages, mask, ranks)
    else:
        kl_of_all = ranks.gather_rows(sequence_kl, rows, len(scores)) if algo.kl_in_reward else None
        shaped = scores - kl_coef * kl_of_all if algo.kl_in_reward else scores
        advantages = sequence_advantages(algo.name, shaped, group_sizes, advantage_scale=algo.advantage_scale,
                                         advantage_std=algo.advantage_std,
                                         single_sample_groups=algo.single_sample_groups, baseline=baseline)
        advantages = advantages[rows.to(advantages.device)]
    return UpdateTargets(
        batch=batch, old_logp=old_logp, entropy=entropy, ref_logp=ref_logp, old_values=old_values,
        advantages=alg.clip_advantages(advantages, algo.advantage_clip), returns=returns, importance=importance,
        sequence_kl=sequence_kl, kl_coef=kl_coef, old_from_training_forward=not needs_old_pass(algo), rows=rows,
    )


def whiten_across_ranks(x: torch.Tensor, mask: torch.Tensor, ranks: Ranks, eps: float = 1e-8) -> torch.Tensor:
    """`algorithms.masked_whiten` with the mean and (population) variance over every rank's valid tokens."""
    if ranks.alone:
        return alg.masked_whiten(x, mask, eps=eps)
    count = ranks.sum(mask.sum())
    mean = ranks.sum(alg.masked_sum(x, mask)) / count
    var = ranks.sum(alg.masked_sum((x - mean) ** 2, mask)) / count
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask != 0, whitened, torch.zeros_like(x))


def explained_variance_across_ranks(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                                    ranks: Ranks = SINGLE) -> float:
    """`algorithms.explained_variance` over every rank's valid tokens."""
    if ranks.alone:
        return alg.explained_variance(values, returns, mask)
    residual = returns - values
    sums = ranks.sum(torch.stack([mask.sum(), alg.masked_sum(returns, mask), alg.masked_sum(returns**2, mask),
                                  alg.masked_sum(residual, mask), alg.masked_sum(residual**2, mask)]).double())
    count, r1, r2, e1, e2 = (float(v) for v in sums)
    var_returns = r2 / count - (r1 / count) ** 2
    if var_returns <= 0:
        return math.nan
    return 1.0 - (e2 / count - (e1 / count) ** 2) / var_returns


def shaped_rewards(targets: UpdateTargets, scores: torch.Tensor, algo: AlgorithmConfig,
                   ranks: Ranks = SINGLE) -> torch.Tensor:
    """The whole batch's sequence rewards the advantages were computed from (the REINFORCE baseline tracks
    their mean)."""
    if not algo.kl_in_reward:
        return scores
    return scores - targets.kl_coef * ranks.gather_rows(targets.sequence_kl, targets.rows, len(scores))


# ----- the loss of a part of a minibatch -----


def minibatch_loss(policy: ScoringPolicy, targets: UpdateTargets, rows: torch.Tensor, normaliser: alg.Normaliser,
                   algo: AlgorithmConfig, max_new_tokens: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of rows `rows` under the current weights, as their share of a minibatch counted by `normaliser`.

    loss = aggregate(clipped surrogate [* IS weight] + beta_loss * KL_estimator - c_H * entropy)
           + c_V * token_mean(clipped value loss)
    Summing the returned loss (and stats) over the parts of a minibatch gives the minibatch's values.
    """
    part = targets.batch.select(rows)
    mask = part.completion_mask
    with_values = targets.returns is not None
    with_entropy = algo.entropy_coef > 0 or targets.old_from_training_forward
    current, values = policy.score(part, with_entropy=with_entropy, with_values=with_values)
    if targets.old_from_training_forward:
        _fill_old_from(targets, rows, current, algo)
    old_logp = targets.old_logp[rows]
    importance = None if targets.importance is None else targets.importance[rows]

    loss, stats = policy_objective(
        current.logprobs, old_logp, None if targets.ref_logp is None else targets.ref_logp[rows],
        targets.advantages[rows], mask,
        clip_low=algo.clip_low, clip_high=algo.clip_high, kl_coef_in_loss=0.0 if algo.kl_in_reward else targets.kl_coef,
        kl_estimator=algo.kl_estimator, aggregation=algo.loss_aggregation, max_new_tokens=max_new_tokens,
        normaliser=normaliser, importance_weights=importance, entropy=current.entropy, entropy_coef=algo.entropy_coef,
    )
    if with_values:
        value_loss = alg.aggregate_loss(
            alg.clipped_value_loss(values, targets.old_values[rows], targets.returns[rows], mask, algo.value_clip),
            mask, "token_mean", normaliser=normaliser)
        loss = loss + algo.value_coef * value_loss
        stats["value_loss"] = value_loss.detach()
    stats["loss"] = loss.detach()
    return loss, stats


def policy_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float | None,
    kl_coef_in_loss: float,
    kl_estimator: str,
    aggregation: str,
    max_new_tokens: int,
    normaliser: alg.Normaliser | None = None,
    importance_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate [* IS weight] + kl_coef_in_loss * KL estimator - entropy_coef * entropy, aggregated.

    `advantages` is [B] (sequence methods) or [B, T] (PPO with GAE). Token means and the aggregation divide
    by `normaliser` (the minibatch these rows belong to; None: these rows alone). With kl_coef_in_loss = 0
    the KL is still measured for logging.
    """
    policy_per_token, clipped = alg.clipped_surrogate_loss(logp, old_logp, advantages, clip_low, clip_high, importance_weights)
    # No reference (no KL term on): the KL is neither in the loss nor measured.
    kl = alg.kl_per_token(logp, ref_logp, kl_estimator) if ref_logp is not None else None
    per_token = policy_per_token + kl_coef_in_loss * kl if kl is not None else policy_per_token
    if entropy is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy

    def aggregate(x: torch.Tensor, mode: str = aggregation) -> torch.Tensor:
        return alg.aggregate_loss(x, mask, mode, constant=max_new_tokens, normaliser=normaliser)

    stats = {
        "policy_loss": aggregate(policy_per_token).detach(),
        **({"kl": aggregate(kl, "token_mean").detach()} if kl is not None else {}),
        "clip_fraction": aggregate(clipped.float(), "token_mean").detach(),
        "approx_kl": aggregate(0.5 * (logp - old_logp) ** 2, "token_mean").detach(),
    }
    return aggregate(per_token), stats


@torch.no_grad()
def _fill_old_from(targets: UpdateTargets, rows: torch.Tensor, current: TokenScores, algo: AlgorithmConfig) -> None:
    old = current.logprobs.detach()
    mask = targets.batch.completion_mask[rows]
    targets.old_logp[rows] = old
    targets.entropy[rows] = current.entropy.detach()
    if targets.ref_logp is not None:
        targets.sequence_kl[rows] = alg.masked_sum(alg.kl_per_token(old, targets.ref_logp[rows], "k1"), mask, dim=-1)
    if targets.importance is not None:
        targets.importance[rows] = alg.truncated_importance_weights(
            old, targets.batch.behaviour_logprobs[rows], algo.importance_sampling_cap)


# ----- the update -----


def run_update(policy: ScoringPolicy, targets: UpdateTargets, algo: AlgorithmConfig, *, micro_batch_size: int,
               max_new_tokens: int, optimizer_step, shuffle: torch.Generator, completion_lengths: torch.Tensor | None = None,
               ranks: Ranks = SINGLE) -> tuple[dict[str, float], list[float]]:
    """`epochs` passes over the batch, each `num_minibatches` optimizer steps; returns the mean of each
    minibatch's loss terms over all optimizer steps, and the gradient norm of every step.

    Minibatches are drawn over the whole batch (the same order on every rank, from the same `shuffle`
    state); each rank works through its own rows of them, `micro_batch_size` at a time, and the
    normaliser counts the whole minibatch from `completion_lengths` [B] (every sample's token count).
    `optimizer_step()` clips, steps and zeroes the gradients, and returns the norm before clipping.
    """
    local_count = targets.batch.input_ids.shape[0]
    size = local_count if completion_lengths is None else len(completion_lengths)
    if completion_lengths is None:
        completion_lengths = targets.batch.completion_mask.sum(-1).cpu()
    local_index = torch.full((size,), -1, dtype=torch.long)
    local_index[targets.rows] = torch.arange(local_count)
    # Every rank sums the same keys, even one that owns no row of a minibatch.
    keys = (["loss", "policy_loss"] + (["kl"] if targets.ref_logp is not None else []) + ["clip_fraction", "approx_kl"]
            + (["value_loss"] if targets.returns is not None else []))
    totals = torch.zeros(len(keys), dtype=torch.float64)
    grad_norms = []
    for _ in range(algo.epochs):
        order = torch.randperm(size, generator=shuffle) if algo.num_minibatches > 1 else torch.arange(size)
        for minibatch in torch.tensor_split(order, algo.num_minibatches):
            normaliser = alg.Normaliser(tokens=float(completion_lengths[minibatch].sum()), sequences=len(minibatch))
            mine = local_index[minibatch]
            mine = mine[mine >= 0]
            # A shuffled minibatch's rows, grouped by prompt, so micro-batches keep the prompts they share
            # (score_tokens runs each once); the minibatch's summed gradient does not depend on the order.
            mine = mine[torch.argsort(targets.batch.prompt_group.cpu()[mine], stable=True)]
            for rows in torch.split(mine, micro_batch_size):
                loss, stats = minibatch_loss(policy, targets, rows, normaliser, algo, max_new_tokens)
                loss.backward()
                totals += torch.stack([stats[key].detach().double().cpu() for key in keys])
            ranks.sum_gradients(policy.trainable_parameters)
            grad_norms.append(optimizer_step())
    return {key: float(value) / len(grad_norms) for key, value in zip(keys, ranks.sum(totals))}, grad_norms
