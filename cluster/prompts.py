"""Prompts for a run: tokenised once and fitted to the prompt budget, then served in a deterministic order
(shuffled epochs, a cursor, and a seed per prompt)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from raylign.common.config import RunConfig
from raylign.common.model_checks import load_tokenizer, max_positions
from raylign.common.prompt_budget import FittedPrompts, PromptBudgetReport, PromptLimit, default_max_model_len, fit_prompts
from raylign.common.prompt_completion import encode_prompt
from raylign.common.types import PromptItem


class PromptEncoder:
    """Tokenises prompt sets with the model's tokenizer (and chat template) so every engine sees the same ids,
    and fits each set to one prompt budget (`common.prompt_budget`), counting what it truncated or dropped."""

    def __init__(self, config: RunConfig, model_path: str):
        self.config = config
        self.tokenizer = load_tokenizer(model_path)
        self.positions = max_positions(model_path)
        data, rollout = config.data, config.rollout
        self.limit = PromptLimit.of(data.max_prompt_tokens, rollout.max_model_len, rollout.max_new_tokens, self.positions)
        self.report = PromptBudgetReport(self.limit, data.prompt_overflow)

    def encode(self, texts: list[str], split: str) -> FittedPrompts:
        data = self.config.data
        token_ids = [encode_prompt(self.tokenizer, text, chat_template=data.chat_template, field="data.chat_template")
                     for text in texts]
        fitted = fit_prompts(token_ids, self.limit, data.prompt_overflow, bos_token_id=self.tokenizer.bos_token_id,
                             where=f"data.prompts = '{data.prompts}' (split '{split}')")
        self.report.splits[split] = fitted.counts(len(texts))
        self.report.longest = max(self.report.longest, fitted.longest)
        return fitted

    def max_model_len(self) -> int:
        """The context the rollout engines reserve, from the longest prompt of every set encoded so far."""
        data, rollout = self.config.data, self.config.rollout
        return default_max_model_len(rollout.max_model_len, data.max_prompt_tokens, self.report.longest,
                                     rollout.max_new_tokens, self.positions)

    def summary(self) -> dict:
        return self.report.to_dict(self.max_model_len())


@dataclass
class PromptCursor:
    """Everything needed to resume the prompt stream: small and JSON-serialisable."""

    epoch: int = 0
    position: int = 0


class PromptSampler:
    def __init__(self, texts: list[str], token_ids: list[list[int]], seed: int, extras: list[dict] | None = None,
                 truncated: list[bool] | None = None):
        if not texts:
            raise ValueError("the prompt set is empty; check data.prompts and data.split")
        self.texts, self.token_ids, self.seed = texts, token_ids, seed
        self.extras = extras or [{} for _ in texts]
        self.truncated = truncated or [False for _ in texts]
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
                                    extra=self.extras[index], truncated=self.truncated[index]))
        return items
