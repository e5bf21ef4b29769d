"""What the offline trainers (masked SFT, reward model, DPO) share: batch order, the optimiser step, and how
data-parallel ranks split the work.

With N ranks (`data_parallel.Ranks`) every rank draws the same batches from the same seed and differentiates
its share of each (`rank_share`); each loss term is a sum over the rank's rows divided by the count over the
whole batch, so the ranks' gradients *sum* to the one-rank gradient, and the optimiser sums them before
clipping, so every rank takes the same step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import torch

from raylign.learner.data_parallel import SINGLE, Ranks


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


def rank_share(indices: list[int], ranks: Ranks) -> list[int]:
    """This rank's rows of a batch of `indices`."""
    if len(indices) < ranks.world_size:
        raise ValueError(
            f"training.batch_size = {len(indices)} is smaller than the {ranks.world_size} learners (resources.num_learners); "
            "every learner needs a row of each batch: raise training.batch_size or lower resources.num_learners"
        )
    return [indices[i] for i in ranks.rows(len(indices))]


def score_in_shares(score: Callable[[list], tuple[torch.Tensor, ...]], items: Sequence, batch_size: int,
                    ranks: Ranks = SINGLE) -> tuple[torch.Tensor, ...]:
    """`score(chunk)` returns tensors with one row per item of `chunk`; this scores every item, `batch_size` at a
    time, each rank its share, and returns every item's rows (on the CPU) on every rank. A set smaller than the
    group is scored whole by each rank."""
    share = ranks if len(items) >= ranks.world_size else SINGLE
    rows = share.rows(len(items))
    local = [items[i] for i in rows]
    parts = [tuple(t.detach().cpu() for t in score(local[start:start + batch_size]))
             for start in range(0, len(local), batch_size)]
    return tuple(share.gather_rows(torch.cat(column), rows, len(items)) for column in zip(*parts))


def trainable_parameters(model, parameters=None) -> list[torch.nn.Parameter]:
    """The parameters to optimise: those given, else the model's, keeping only those with requires_grad."""
    chosen = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if not chosen:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return chosen


class Optimiser:
    """AdamW with a linear decay to 0 over `steps`, gradient clipping, and the pre-clip norm returned. The
    gradients are summed over `ranks` before clipping (each rank's loss is its share of the batch's)."""

    def __init__(self, parameters: list[torch.nn.Parameter], learning_rate: float, steps: int, max_grad_norm: float = 1.0,
                 ranks: Ranks = SINGLE):
        self.parameters, self.ranks = parameters, ranks
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 - step / max(steps, 1))

    def step(self, loss: torch.Tensor) -> float:
        loss.backward()
        self.ranks.sum_gradients(self.parameters)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)
