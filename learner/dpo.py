"""Direct Preference Optimisation (sigmoid loss, or IPO) on chosen/rejected pairs.

The losses are pure functions of four per-sequence logprobs: the policy's and the reference's, of the chosen
and of the rejected completion (prompt tokens excluded). The reference is the same PEFT model with its adapter
disabled, scored once before training: it never changes, so scoring it every step would only cost time.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn.functional as F

from raylign.common.preference_data import PreferenceExample
from raylign.common.prompt_completion import (
    collate_prompt_completion,
    encode_preference_pairs,
    encode_prompt_completion,
    pad_token_id,
)
from raylign.learner import offline_loop
from raylign.learner.data_parallel import SINGLE, Ranks

LossType = Literal["sigmoid", "ipo"]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    count: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (mean over pairs) and metrics. With `count` (the pairs of the whole batch, when these are one rank's
    share of it) the loss and every metric are sums over these pairs divided by `count`: the ranks' values sum
    to the batch's means.

    With h = (π_c − ref_c) − (π_r − ref_r):
      sigmoid (DPO, Rafailov et al. 2023): −log σ(β·h)
      ipo (Azar et al. 2023):             (h − 1/(2β))²
    Implicit rewards β·(π − ref) give `rewards/chosen`, `rewards/rejected`, `rewards/margins` (their mean
    difference) and `rewards/accuracies` (share of pairs with chosen reward > rejected reward).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type = '{loss_type}' is unknown; choose 'sigmoid' (DPO) or 'ipo'")
    count = len(h) if count is None else count
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.sum() / count,
        "rewards/rejected": rejected_rewards.sum() / count,
        "rewards/margins": (chosen_rewards - rejected_rewards).sum() / count,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum() / count,
    }
    return losses.sum() / count, metrics


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the completion tokens of each row [B], and their number [B]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    mask = completion_mask[:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)


@torch.no_grad()
def completion_logprob(model, tokenizer, prompt: str, completion: str, *, messages: list[dict] | None = None,
                       chat_template: bool | None = None, max_length: int | None = None) -> float:
    """log π(completion | prompt), summed over the completion's tokens (EOS included)."""
    pair = encode_prompt_completion(tokenizer, prompt, completion, messages=messages, chat_template=chat_template,
                                    max_length=max_length)
    batch = collate_prompt_completion([pair], pad_token_id(tokenizer))
    device = next(model.parameters()).device
    logps, _ = sequence_logprobs(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")))
    return logps.item()


def _pair_logprobs(model, pairs, pad_id: int, device, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected logprobs [B] each, from one forward over both."""
    batch = collate_prompt_completion([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    logps, counts = sequence_logprobs(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")))
    if average:
        logps = logps / counts.clamp(min=1)
    return logps[: len(pairs)], logps[len(pairs):]


@torch.no_grad()
def reference_logprobs(model, pairs, *, batch_size: int, pad_id: int, average: bool,
                       reference_model=None, ranks: Ranks = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference logprobs of every pair: `reference_model` when given, else `model` with its adapter disabled
    (each rank scores its share; every rank returns all)."""
    if reference_model is None and not hasattr(model, "disable_adapter"):
        raise ValueError(
            "DPO's reference is the policy with its LoRA adapter disabled, but this model has no adapter; "
            "wrap it with peft.get_peft_model (LoRA) or pass reference_model= a frozen copy"
        )
    scorer = reference_model if reference_model is not None else model
    device = next(scorer.parameters()).device
    was_training = scorer.training
    scorer.eval()
    with model.disable_adapter() if reference_model is None else nullcontext():
        chosen, rejected = offline_loop.score_in_shares(
            lambda chunk: _pair_logprobs(scorer, chunk, pad_id, device, average), pairs, batch_size, ranks)
    scorer.train(was_training)
    return chosen, rejected


@torch.no_grad()
def dpo_metrics(model, pairs, reference: tuple[torch.Tensor, torch.Tensor], *, batch_size: int, pad_id: int,
                beta: float, loss_type: LossType, prefix: str = "eval/", ranks: Ranks = SINGLE) -> dict[str, float]:
    """Loss and reward metrics over a whole set, with the reference logprobs already computed."""
    device = next(model.parameters()).device
    chosen, rejected = offline_loop.score_in_shares(
        lambda chunk: _pair_logprobs(model, chunk, pad_id, device, loss_type == "ipo"), pairs, batch_size, ranks)
    loss, metrics = dpo_loss(chosen, rejected, *reference, beta=beta, loss_type=loss_type)
    return {f"{prefix}loss": loss.item(), **{f"{prefix}{k}": v.item() for k, v in metrics.items()}}


def dpo_train(
    model,
    tokenizer,
    examples: Sequence[PreferenceExample],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    val_examples: Sequence[PreferenceExample] | None = None,
    eval_every: int = 0,
    chat_template: bool | None = None,
    max_grad_norm: float = 1.0,
    reference_model=None,
    trainable_parameters=None,
    ranks: Ranks = SINGLE,
) -> list[dict[str, float]]:
    """Train the adapter of a PEFT `model` with DPO (or IPO) on chosen/rejected pairs.

    Reference logprobs for the training and validation pairs are computed once, up front, with the adapter
    disabled. Dropout stays off throughout (the model runs in eval mode) so that, before the first update,
    policy and reference agree exactly. IPO uses per-token mean logprobs (as TRL does) so its target margin
    1/(2β) does not depend on length; the sigmoid loss uses sums. Returns one metrics row per step (`step`,
    `loss`, `grad_norm`, `rewards/*`, `logps/chosen`, `logps/rejected`); rows every `eval_every` steps and
    the last also carry `eval/loss` and `eval/rewards/*` on `val_examples`. With `ranks` each rank scores and
    differentiates its pairs of every batch (see offline_loop), and every rank returns the same rows.
    """
    if beta <= 0:
        raise ValueError(f"beta = {beta}: must be > 0 (0.1 is the usual choice)")
    average = loss_type == "ipo"
    pad_id = pad_token_id(tokenizer)
    pairs = encode_preference_pairs(tokenizer, examples, max_length=max_length, chat_template=chat_template)
    val_pairs = []
    if val_examples:
        val_pairs = encode_preference_pairs(tokenizer, val_examples, max_length=max_length, chat_template=chat_template)
    ref_chosen, ref_rejected = reference_logprobs(model, pairs + val_pairs, batch_size=batch_size, pad_id=pad_id,
                                                  average=average, reference_model=reference_model, ranks=ranks)
    train_reference = (ref_chosen[: len(pairs)], ref_rejected[: len(pairs)])
    val_reference = (ref_chosen[len(pairs):], ref_rejected[len(pairs):])
    parameters = offline_loop.trainable_parameters(model, trainable_parameters)
    optimiser = offline_loop.Optimiser(parameters, learning_rate, steps, max_grad_norm, ranks)
    device = next(model.parameters()).device
    batches = offline_loop.index_batches(len(pairs), batch_size, seed)
    model.eval()
    history = []
    for step in range(1, steps + 1):
        batch = next(batches)
        indices = offline_loop.rank_share(batch, ranks)
        chosen, rejected = _pair_logprobs(model, [pairs[i] for i in indices], pad_id, device, average)
        loss, metrics = dpo_loss(
            chosen, rejected, train_reference[0][indices].to(device), train_reference[1][indices].to(device),
            beta=beta, loss_type=loss_type, count=len(batch),
        )
        shares = {"loss": loss.detach(), **metrics, "logps/chosen": chosen.detach().sum() / len(batch),
                  "logps/rejected": rejected.detach().sum() / len(batch)}
        totals = ranks.sum(torch.stack(list(shares.values())))
        row = {"step": step, **{key: float(total) for key, total in zip(shares, totals)}, "grad_norm": optimiser.step(loss)}
        if val_pairs and (step == steps or (eval_every and step % eval_every == 0)):
            row.update(dpo_metrics(model, val_pairs, val_reference, batch_size=batch_size, pad_id=pad_id,
                                   beta=beta, loss_type=loss_type, ranks=ranks))
        history.append(row)
    return history
