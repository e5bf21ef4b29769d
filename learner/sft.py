"""Supervised fine-tuning: on plain text (`sft_train`, next-token loss on non-padding tokens), and on
prompt/completion pairs with the prompt masked out of the loss (`masked_sft_train`)."""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Sequence

import torch

from raylign.common.preference_data import PreferenceExample
from raylign.common.prompt_completion import (
    IGNORE_INDEX,
    collate_prompt_completion,
    encode_prompt_completion,
    pad_token_id,
)
from raylign.learner import offline_loop
from raylign.learner.data_parallel import SINGLE, Ranks


def sft_train(
    model,
    tokenizer,
    texts: list[str],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    trainable_parameters=None,
) -> list[float]:
    """Train `model` in place for `steps` AdamW steps on random batches; returns the per-step losses."""
    if not texts:
        raise ValueError("SFT corpus is empty; point sft.data at a file with at least one text")
    rng = random.Random(seed)
    parameters = [p for p in (trainable_parameters or model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    device = next(model.parameters()).device
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pad_id = pad_token_id(tokenizer)
    model.train()
    losses = []
    for _ in range(steps):
        rows = [(list(tokenizer(rng.choice(texts)).input_ids) + eos)[:max_length] for _ in range(batch_size)]
        batch = collate_prompt_completion([(row, []) for row in rows], pad_id)
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


# ----- prompt-masked SFT on (prompt, completion) pairs -----


def build_sft_example(
    tokenizer,
    prompt: str,
    completion: str,
    *,
    max_length: int,
    messages: list[dict] | None = None,
    chat_template: bool | None = None,
) -> dict[str, list[int]]:
    """{input_ids, labels} for one pair: labels are the input ids with every prompt token at -100.

    The chat template is used when the tokenizer has one (chat_template=None) or when asked (True).
    """
    prompt_ids, completion_ids = encode_prompt_completion(
        tokenizer, prompt, completion, messages=messages, chat_template=chat_template, max_length=max_length
    )
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def encode_sft_examples(tokenizer, examples: Sequence[PreferenceExample], *, max_length: int,
                        chat_template: bool | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) per example, the completion being the example's `chosen`."""
    encoded = []
    for index, example in enumerate(examples):
        if example.chosen is None:
            raise ValueError(f"SFT example {index} has no completion (chosen is None); SFT needs prompt + chosen pairs")
        encoded.append(encode_prompt_completion(
            tokenizer, example.prompt, example.chosen, messages=example.extra.get("prompt_messages"),
            chat_template=chat_template, max_length=max_length,
        ))
    return encoded


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over positions whose label is not -100, and how many there are.
    Position t's logits predict label t+1."""
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (targets != IGNORE_INDEX).sum()


def completion_token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`masked_nll` of the model on a collated batch: summed over completion tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return masked_nll(logits, batch["labels"])


def masked_sft_train(
    model,
    tokenizer,
    examples: Sequence[PreferenceExample],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    chat_template: bool | None = None,
    eval_examples: Sequence[PreferenceExample] | None = None,
    eval_every: int = 0,
    max_grad_norm: float = 1.0,
    trainable_parameters=None,
    ranks: Ranks = SINGLE,
) -> list[dict[str, float]]:
    """Train on prompt -> chosen with the loss on completion tokens only (token mean over the batch).

    Works on a plain or a PEFT model (only parameters with requires_grad train). Returns one metrics row per
    step (`step`, `loss`, `grad_norm`); every `eval_every` steps and at the end, rows also carry
    `eval/loss` and `eval/perplexity` on `eval_examples`. With `ranks` each rank differentiates its rows of
    every batch (see offline_loop), and every rank returns the same rows.
    """
    encoded = encode_sft_examples(tokenizer, examples, max_length=max_length, chat_template=chat_template)
    parameters = offline_loop.trainable_parameters(model, trainable_parameters)
    optimiser = offline_loop.Optimiser(parameters, learning_rate, steps, max_grad_norm, ranks)
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    batches = offline_loop.index_batches(len(encoded), batch_size, seed)
    history = []
    model.train()
    for step in range(1, steps + 1):
        batch = collate_prompt_completion([encoded[i] for i in offline_loop.rank_share(next(batches), ranks)], pad_id)
        nll, tokens = completion_token_nll(model, {k: v.to(device) for k, v in batch.items()})
        loss = nll / ranks.sum(tokens).clamp(min=1)
        row = {"step": step, "loss": float(ranks.sum(loss.detach())), "grad_norm": optimiser.step(loss)}
        if eval_examples and (step == steps or (eval_every and step % eval_every == 0)):
            row.update(sft_eval(model, tokenizer, eval_examples, batch_size=batch_size, max_length=max_length,
                                chat_template=chat_template, ranks=ranks))
            model.train()
        history.append(row)
    model.eval()
    return history


@torch.no_grad()
def sft_eval(
    model,
    tokenizer,
    examples: Sequence[PreferenceExample],
    *,
    batch_size: int,
    max_length: int,
    chat_template: bool | None = None,
    ranks: Ranks = SINGLE,
) -> dict[str, float]:
    """Held-out loss (mean NLL per completion token over the whole set) and its perplexity; with `ranks`, each
    rank scores its share of the set."""
    encoded = encode_sft_examples(tokenizer, examples, max_length=max_length, chat_template=chat_template)
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    model.eval()

    def score(chunks):
        """The summed NLL and the token count of each chunk, one chunk (one forward) at a time."""
        (chunk,) = chunks
        nll, tokens = completion_token_nll(model, {k: v.to(device) for k, v in collate_prompt_completion(chunk, pad_id).items()})
        return nll.reshape(1), tokens.reshape(1)

    # The chunks are fixed before the ranks share them out, so N ranks pad and sum exactly as one does.
    chunks = [encoded[start:start + batch_size] for start in range(0, len(encoded), batch_size)]
    total_nll, total_tokens = 0.0, 0
    if chunks:
        nll, tokens = offline_loop.score_in_shares(score, chunks, 1, ranks)
        total_nll, total_tokens = float(nll.double().sum()), int(tokens.sum())
    loss = total_nll / max(total_tokens, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(loss), "eval/tokens": total_tokens}


# ----- QLoRA -----


def qlora_quantization_config(field: str = "model.quantization", value: str = "4bit", compute_dtype=torch.bfloat16):
    """bitsandbytes 4-bit NF4 config (double quantisation) for QLoRA; pass it as `quantization_config=` to
    `from_pretrained`, then `peft.prepare_model_for_kbit_training` before attaching LoRA.

    Raises ValueError naming `field` = `value` and the fix when there is no CUDA GPU or no bitsandbytes.
    """
    if not torch.cuda.is_available():
        raise ValueError(
            f"{field} = {value}: QLoRA's 4-bit weights need bitsandbytes on a CUDA GPU, and no GPU is visible here; "
            f"remove {field} (plain LoRA on full-precision weights) or run on a GPU node"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{field} = {value}: bitsandbytes is not installed; pip install bitsandbytes, or remove {field}")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
    )
