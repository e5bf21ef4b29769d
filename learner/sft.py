"""Supervised fine-tuning on plain text: next-token loss on non-padding tokens."""

from __future__ import annotations

import random

import torch


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
    eos = tokenizer.eos_token or ""
    model.train()
    losses = []
    for _ in range(steps):
        batch_texts = [rng.choice(texts) + eos for _ in range(batch_size)]
        encoded = tokenizer(batch_texts, return_tensors="pt", padding=True, padding_side="right",
                            truncation=True, max_length=max_length).to(device)
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
