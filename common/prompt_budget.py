"""The prompt budget: how long a prompt may be, what happens to longer ones, and the context the engines reserve.

A prompt and its completion must fit the model's positions, and the rollout engine must reserve room for the
longest of them before it starts (vLLM refuses a longer request mid-run). So every prompt set is fitted at
load, under one limit: `data.max_prompt_tokens`, and never more than the context (`rollout.max_model_len`, else
the model's max_position_embeddings) minus `rollout.max_new_tokens`. Longer prompts follow
`data.prompt_overflow`: refused with a count and the fix, truncated from the left, or dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptLimit:
    tokens: int  # longest prompt accepted
    why: str  # where the limit comes from, for messages

    @staticmethod
    def of(max_prompt_tokens: int | None, max_model_len: int | None, max_new_tokens: int,
           positions: int | None) -> "PromptLimit":
        """The limit from the config fields and the model's positions (None: unknown, no limit of its own)."""
        if max_model_len is not None and positions is not None and max_model_len > positions:
            raise ValueError(
                f"rollout.max_model_len = {max_model_len} exceeds the model's {positions} positions "
                f"(max_position_embeddings); set rollout.max_model_len={positions} or less, or leave it unset"
            )
        context, context_name = ((max_model_len, f"rollout.max_model_len = {max_model_len}") if max_model_len is not None
                                 else (positions, f"the model's {positions} positions"))
        limits = []
        if context is not None:
            room = context - max_new_tokens
            if room < 1:
                raise ValueError(
                    f"rollout.max_new_tokens = {max_new_tokens} leaves no room for a prompt in {context_name}, which "
                    f"each prompt and its completion share; set rollout.max_new_tokens to {context} minus the longest "
                    f"prompt or less, e.g. rollout.max_new_tokens={max(1, context // 4)}"
                )
            limits.append((room, f"{context_name} minus rollout.max_new_tokens = {max_new_tokens}"))
        if max_prompt_tokens is not None:
            limits.append((max_prompt_tokens, f"data.max_prompt_tokens = {max_prompt_tokens}"))
        if not limits:
            return PromptLimit(tokens=10**9, why="no limit (the model declares no positions)")
        tokens, why = min(limits)
        return PromptLimit(tokens=tokens, why=why)


@dataclass
class FittedPrompts:
    kept: list[int]  # indices into the input of the prompts kept, in order
    token_ids: list[list[int]]  # their token ids, truncated where needed
    truncated: list[bool]  # per kept prompt
    dropped: int = 0

    @property
    def longest(self) -> int:
        return max((len(ids) for ids in self.token_ids), default=0)

    def counts(self, total: int) -> dict[str, int]:
        return {"total": total, "kept": len(self.kept), "truncated": sum(self.truncated), "dropped": self.dropped}


@dataclass
class PromptBudgetReport:
    """What fitting did to each prompt set; results.json `prompts`."""

    limit: PromptLimit
    overflow: str
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    longest: int = 0

    def to_dict(self, max_model_len: int) -> dict:
        return {"max_prompt_tokens": self.limit.tokens, "limit": self.limit.why, "overflow": self.overflow,
                "max_model_len": max_model_len, "longest_prompt": self.longest, "splits": self.splits}


def fit_prompts(token_ids: list[list[int]], limit: PromptLimit, overflow: str, *, bos_token_id: int | None,
                where: str) -> FittedPrompts:
    """Apply the overflow policy ('error', 'truncate_left', 'drop') to prompts longer than the limit.

    Left truncation keeps a prompt's last tokens, the ones the completion continues, and its leading BOS
    when the tokenizer added one (a model trained with BOS expects it at position 0).
    """
    over = [i for i, ids in enumerate(token_ids) if len(ids) > limit.tokens]
    if over and overflow == "error":
        longest = max(len(token_ids[i]) for i in over)
        raise ValueError(
            f"{where}: {len(over)} of {len(token_ids)} prompts are longer than {limit.tokens} tokens ({limit.why}); "
            f"the longest has {longest}. Set data.prompt_overflow=truncate_left (keep their last tokens) or "
            "data.prompt_overflow=drop, raise data.max_prompt_tokens or rollout.max_model_len (within the model's "
            "positions), or lower rollout.max_new_tokens"
        )
    fitted = FittedPrompts(kept=[], token_ids=[], truncated=[])
    for index, ids in enumerate(token_ids):
        if len(ids) <= limit.tokens:
            fitted.kept.append(index)
            fitted.token_ids.append(list(ids))
            fitted.truncated.append(False)
        elif overflow == "drop":
            fitted.dropped += 1
        else:
            keep_bos = bos_token_id is not None and ids[0] == bos_token_id and limit.tokens > 1
            tail = list(ids[len(ids) - (limit.tokens - keep_bos):])
            fitted.kept.append(index)
            fitted.token_ids.append([ids[0]] + tail if keep_bos else tail)
            fitted.truncated.append(True)
    if not fitted.kept:
        raise ValueError(
            f"{where}: all {len(token_ids)} prompts are longer than {limit.tokens} tokens ({limit.why}) and "
            "data.prompt_overflow = 'drop' drops them all; raise the limit or use data.prompt_overflow=truncate_left"
        )
    return fitted


def default_max_model_len(max_model_len: int | None, max_prompt_tokens: int | None, longest_prompt: int,
                          max_new_tokens: int, positions: int | None) -> int:
    """rollout.max_model_len when set; else the prompt budget (data.max_prompt_tokens, else the longest prompt)
    plus max_new_tokens, capped by the model's positions."""
    if max_model_len is not None:
        return max_model_len
    length = (max_prompt_tokens or longest_prompt) + max_new_tokens
    return min(length, positions) if positions is not None else length
