"""Reward-model training: Bradley-Terry on preference pairs (scalar RM), cross-entropy on labels (classifier RM).

The losses are pure functions on tensors. The loops take any module with
`forward(input_ids, attention_mask) -> rewards [B]` (scalar RM) or `-> logits [B, C]` (classifier RM);
batches are right-padded, so a model pooling "the last token" must find it through attention_mask.
Sequences are tokenised as the policy's are (`common.prompt_completion`): prompt, then completion, then EOS.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from raylign.common.preference_data import PreferenceExample
from raylign.common.prompt_completion import collate_prompt_completion, encode_preference_pairs, pad_token_id
from raylign.learner import offline_loop
from raylign.learner.data_parallel import SINGLE, Ranks

# ----- losses (pure) -----


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    count: int | None = None,
) -> torch.Tensor:
    """mean(-log σ(r_c − r_r − margin)) + center_coef · mean((r_c + r_r)²).

    The margin (Llama 2) asks for a larger gap on pairs known to differ more; the centring term
    (Eisenstein et al. 2023) pins the reward's free offset so scores stay near zero mean. With `count` (the
    pairs of the whole batch, when these are one rank's share) each mean is a sum over these pairs / `count`.
    """
    count = len(chosen_rewards) if count is None else count
    gap = chosen_rewards - rejected_rewards
    if margin is not None:
        gap = gap - margin
    loss = -F.logsigmoid(gap).sum() / count
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards).pow(2).sum() / count
    return loss


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Share of pairs where the chosen reward is strictly higher (a tie counts as a mistake)."""
    return (chosen_rewards > rejected_rewards).float().mean()


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Cross-entropy of class logits [B, C] against integer labels [B]: the mean, or the sum / `count`."""
    return F.cross_entropy(logits.float(), labels, reduction="sum") / (len(labels) if count is None else count)


# ----- scalar (Bradley-Terry) reward model -----


def _pair_rewards(model, encoded_pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected together (same padding for both)."""
    batch = collate_prompt_completion([pair[0] for pair in encoded_pairs] + [pair[1] for pair in encoded_pairs], pad_id)
    rewards = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
    return rewards[: len(encoded_pairs)], rewards[len(encoded_pairs):]


@torch.no_grad()
def score_pairs(model, tokenizer, examples: Sequence[PreferenceExample], *, batch_size: int, max_length: int,
                chat_template: bool | None = None, ranks: Ranks = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every chosen and every rejected completion, [N] each (each rank scores its share)."""
    encoded = encode_preference_pairs(tokenizer, examples, max_length=max_length, chat_template=chat_template)
    device, pad_id = next(model.parameters()).device, pad_token_id(tokenizer)
    model.eval()
    return offline_loop.score_in_shares(lambda chunk: _pair_rewards(model, chunk, pad_id, device), encoded, batch_size, ranks)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, prefix: str = "val/") -> dict[str, float]:
    return {
        f"{prefix}accuracy": pairwise_accuracy(chosen, rejected).item(),
        f"{prefix}loss": bradley_terry_loss(chosen, rejected).item(),
        f"{prefix}margin_mean": (chosen - rejected).mean().item(),
        f"{prefix}reward_chosen_mean": chosen.mean().item(),
        f"{prefix}reward_rejected_mean": rejected.mean().item(),
    }


def train_reward_model(
    model,
    tokenizer,
    examples: Sequence[PreferenceExample],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    val_examples: Sequence[PreferenceExample] | None = None,
    eval_every: int = 0,
    margin: float | Callable[[PreferenceExample], float] | None = None,
    center_coef: float = 0.0,
    chat_template: bool | None = None,
    max_grad_norm: float = 1.0,
    trainable_parameters=None,
    ranks: Ranks = SINGLE,
) -> list[dict[str, float]]:
    """Bradley-Terry training of a scalar RM on chosen/rejected pairs.

    `margin` is a constant or a function of the example (e.g. its score gap). Returns one metrics row per step
    (`step`, `loss`, `accuracy`, `margin_mean`, `grad_norm`); rows at every `eval_every` steps and the last
    also carry `val/accuracy`, `val/loss`, `val/margin_mean`, ... on `val_examples`. With `ranks` each rank
    scores and differentiates its pairs of every batch (see offline_loop); every rank returns the same rows.
    """
    encoded = encode_preference_pairs(tokenizer, examples, max_length=max_length, chat_template=chat_template)
    margins = None
    if margin is not None:
        margins = torch.tensor([margin(e) if callable(margin) else float(margin) for e in examples], dtype=torch.float32)
    parameters = offline_loop.trainable_parameters(model, trainable_parameters)
    optimiser = offline_loop.Optimiser(parameters, learning_rate, steps, max_grad_norm, ranks)
    device, pad_id = next(model.parameters()).device, pad_token_id(tokenizer)
    batches = offline_loop.index_batches(len(encoded), batch_size, seed)
    history = []
    model.train()
    for step in range(1, steps + 1):
        batch = next(batches)
        indices = offline_loop.rank_share(batch, ranks)
        chosen, rejected = _pair_rewards(model, [encoded[i] for i in indices], pad_id, device)
        batch_margin = margins[indices].to(device) if margins is not None else None
        loss = bradley_terry_loss(chosen, rejected, margin=batch_margin, center_coef=center_coef, count=len(batch))
        loss_total, correct, gap = ranks.sum(torch.stack([
            loss.detach(), (chosen > rejected).float().sum(), (chosen - rejected).detach().sum()]))
        row = {
            "step": step, "loss": float(loss_total), "accuracy": float(correct) / len(batch),
            "margin_mean": float(gap) / len(batch), "grad_norm": optimiser.step(loss),
        }
        if val_examples and (step == steps or (eval_every and step % eval_every == 0)):
            row.update(pair_metrics(*score_pairs(model, tokenizer, val_examples, batch_size=batch_size,
                                                 max_length=max_length, chat_template=chat_template, ranks=ranks)))
            model.train()
        history.append(row)
    model.eval()
    return history


def write_reward_model_mistakes(
    path: str | Path,
    examples: Sequence[PreferenceExample],
    chosen_scores: torch.Tensor | Sequence[float],
    rejected_scores: torch.Tensor | Sequence[float],
) -> int:
    """Write every pair the RM gets wrong (chosen score ≤ rejected score) as JSON lines, worst first:
    prompt, chosen, rejected, score_chosen, score_rejected. Returns how many were written."""
    chosen_scores = [float(s) for s in chosen_scores]
    rejected_scores = [float(s) for s in rejected_scores]
    if not len(examples) == len(chosen_scores) == len(rejected_scores):
        raise ValueError(f"{len(examples)} examples but {len(chosen_scores)} chosen and {len(rejected_scores)} rejected scores")
    wrong = [i for i in range(len(examples)) if chosen_scores[i] <= rejected_scores[i]]
    wrong.sort(key=lambda i: chosen_scores[i] - rejected_scores[i])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in wrong:
            f.write(json.dumps({
                "prompt": examples[i].prompt, "chosen": examples[i].chosen, "rejected": examples[i].rejected,
                "score_chosen": chosen_scores[i], "score_rejected": rejected_scores[i],
            }) + "\n")
    return len(wrong)


# ----- classifier reward model -----


def classifier_text(example: PreferenceExample) -> str:
    """What a classifier RM reads: the full text when the source has one (IMDB review), else the prompt."""
    return example.extra.get("text") or example.prompt


def _encode_texts(tokenizer, examples: Sequence[PreferenceExample], max_length: int) -> list[list[int]]:
    encoded = []
    for index, example in enumerate(examples):
        if example.label is None:
            raise ValueError(f"example {index} has no label; classifier training needs labelled rows (e.g. format 'imdb')")
        encoded.append(list(tokenizer(classifier_text(example), truncation=True, max_length=max_length).input_ids))
    return encoded


def _collate_texts(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate_prompt_completion([(ids, []) for ids in rows], pad_id)
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def classifier_metrics(model, tokenizer, examples: Sequence[PreferenceExample], *, batch_size: int, max_length: int,
                       prefix: str = "val/", ranks: Ranks = SINGLE) -> dict[str, float]:
    encoded = _encode_texts(tokenizer, examples, max_length)
    labels = torch.tensor([e.label for e in examples])
    device, pad_id = next(model.parameters()).device, pad_token_id(tokenizer)
    model.eval()
    (logits,) = offline_loop.score_in_shares(
        lambda chunk: (model(*(t.to(device) for t in _collate_texts(chunk, pad_id))).float(),), encoded, batch_size, ranks)
    return {f"{prefix}accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            f"{prefix}loss": classifier_loss(logits, labels).item()}


def train_reward_classifier(
    model,
    tokenizer,
    examples: Sequence[PreferenceExample],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    val_examples: Sequence[PreferenceExample] | None = None,
    eval_every: int = 0,
    max_grad_norm: float = 1.0,
    trainable_parameters=None,
    ranks: Ranks = SINGLE,
) -> list[dict[str, float]]:
    """Cross-entropy training of a classifier RM on labelled texts. Only parameters with requires_grad train,
    so freezing the backbone beforehand trains the head alone. Rows (and `ranks`) as `train_reward_model`'s."""
    encoded = _encode_texts(tokenizer, examples, max_length)
    labels = torch.tensor([e.label for e in examples])
    parameters = offline_loop.trainable_parameters(model, trainable_parameters)
    optimiser = offline_loop.Optimiser(parameters, learning_rate, steps, max_grad_norm, ranks)
    device, pad_id = next(model.parameters()).device, pad_token_id(tokenizer)
    batches = offline_loop.index_batches(len(encoded), batch_size, seed)
    history = []
    model.train()
    for step in range(1, steps + 1):
        batch = next(batches)
        indices = offline_loop.rank_share(batch, ranks)
        input_ids, attention_mask = _collate_texts([encoded[i] for i in indices], pad_id)
        logits = model(input_ids.to(device), attention_mask.to(device))
        batch_labels = labels[indices].to(device)
        loss = classifier_loss(logits, batch_labels, count=len(batch))
        loss_total, correct = ranks.sum(torch.stack([loss.detach(), (logits.argmax(-1) == batch_labels).float().sum()]))
        row = {"step": step, "loss": float(loss_total), "accuracy": float(correct) / len(batch),
               "grad_norm": optimiser.step(loss)}
        if val_examples and (step == steps or (eval_every and step % eval_every == 0)):
            row.update(classifier_metrics(model, tokenizer, val_examples, batch_size=batch_size, max_length=max_length,
                                          ranks=ranks))
            model.train()
        history.append(row)
    model.eval()
    return history
