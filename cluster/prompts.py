"""Deterministic prompt order: shuffled epochs, a cursor, and a seed per prompt."""

from __future__ import annotations

import random
from dataclasses import dataclass

from raylign.common.types import PromptItem


@dataclass
class PromptCursor:
    """Everything needed to resume the prompt stream: small and JSON-serialisable."""

    epoch: int = 0
    position: int = 0


class PromptSampler:
    def __init__(self, texts: list[str], token_ids: list[list[int]], seed: int, extras: list[dict] | None = None):
        if not texts:
            raise ValueError("the prompt set is empty; check data.prompts and data.split")
        self.texts, self.token_ids, self.seed = texts, token_ids, seed
        self.extras = extras or [{} for _ in texts]
        self.cursor = PromptCursor()
        self._order = self._epoch_order(0)

    def restore(self, cursor: PromptCursor) -> None:
        """Continue the prompt stream from a saved cursor."""
        self.cursor = PromptCursor(cursor.epoch, cursor.position)
        self._order = self._epoch_order(cursor.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.texts)))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int, step: int) -> list[PromptItem]:
        items = []
        for position in range(size):
            if self.cursor.position == len(self._order):
                self.cursor = PromptCursor(self.cursor.epoch + 1, 0)
                self._order = self._epoch_order(self.cursor.epoch)
            index = self._order[self.cursor.position]
            self.cursor.position += 1
            seed = (self.seed * 1_000_003 + step * 10_007 + position) % (2**31 - 1)
            items.append(PromptItem(index=index, text=self.texts[index], token_ids=self.token_ids[index], seed=seed,
                                    extra=self.extras[index]))
        return items
