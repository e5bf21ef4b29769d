"""What the offline trainers (masked SFT, reward model, DPO) share: batch order and the optimiser step."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch


def index_batches(num_items: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices: shuffled passes over the data, each item once per pass."""
    if num_items == 0:
        raise ValueError("the training set is empty; check the data source and split")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(num_items))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def trainable_parameters(model, parameters=None) -> list[torch.nn.Parameter]:
    """The parameters to optimise: those given, else the model's, keeping only those with requires_grad."""
    chosen = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if not chosen:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return chosen


class Optimiser:
    """AdamW with a linear decay to 0 over `steps`, gradient clipping, and the pre-clip norm returned."""

    def __init__(self, parameters: list[torch.nn.Parameter], learning_rate: float, steps: int, max_grad_norm: float = 1.0):
        self.parameters = parameters
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 - step / max(steps, 1))

    def step(self, loss: torch.Tensor) -> float:
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)
