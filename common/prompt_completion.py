"""Tokenise prompt + completion pairs one way for SFT, reward models and DPO, and batch them.

A sequence is `prompt_ids + completion_ids`, tokenised apart so the boundary is exact: SFT masks exactly the
prompt tokens, a completion's logprob covers exactly its own tokens, and a reward model trained on these
sequences scores at inference what it saw in training.

- Without a chat template: the prompt gets the tokenizer's special tokens (BOS), the completion none, plus EOS.
  A space joins them when neither side has whitespace at the seam ("The film was" + "great").
- With one (`tokenizer.chat_template`, used by default when the tokenizer has it): the prompt is the rendered
  conversation with the generation prompt, the completion is the rest of the conversation rendered with the
  reply (its end-of-turn tokens included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raylign.common.preference_data import PreferenceExample

IGNORE_INDEX = -100


def uses_chat_template(tokenizer, chat_template: bool | None) -> bool:
    """None: use the tokenizer's template when it has one. True without one is an error naming the fix."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        return has_template
    if chat_template and not has_template:
        raise ValueError(
            f"chat_template = true, but the tokenizer '{getattr(tokenizer, 'name_or_path', '')}' has no chat template; "
            "set chat_template=false (plain prompt + completion text) or use an instruct model's tokenizer"
        )
    return chat_template


def _text_ids(tokenizer, text: str, special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special_tokens).input_ids)


def _rendered_prompt(tokenizer, prompt: str, messages: list[dict] | None) -> tuple[list[dict], str]:
    conversation = messages or [{"role": "user", "content": prompt}]
    return conversation, tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str, *, messages: list[dict] | None = None, chat_template: bool | None = None) -> list[int]:
    """Token ids of a prompt alone (what a policy is asked to continue); never empty."""
    if uses_chat_template(tokenizer, chat_template):
        ids = _text_ids(tokenizer, _rendered_prompt(tokenizer, prompt, messages)[1], special_tokens=False)
    else:
        ids = _text_ids(tokenizer, prompt, special_tokens=True)
    if not ids:
        # The first completion token needs a position before it to be predicted from (GPT-2 adds no BOS).
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return ids


def encode_prompt_completion(
    tokenizer,
    prompt: str,
    completion: str,
    *,
    messages: list[dict] | None = None,
    chat_template: bool | None = None,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) for one pair; `messages` is the prompt as a conversation, for chat templates."""
    prompt_ids = encode_prompt(tokenizer, prompt, messages=messages, chat_template=chat_template)
    if uses_chat_template(tokenizer, chat_template):
        conversation, prompt_text = _rendered_prompt(tokenizer, prompt, messages)
        full_text = tokenizer.apply_chat_template(
            conversation + [{"role": "assistant", "content": completion.strip()}], tokenize=False
        )
        if full_text.startswith(prompt_text):
            completion_ids = _text_ids(tokenizer, full_text[len(prompt_text):], special_tokens=False)
        else:
            completion_ids = _text_ids(tokenizer, completion.strip(), special_tokens=False) + [tokenizer.eos_token_id]
    else:
        if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
            completion = " " + completion
        completion_ids = _text_ids(tokenizer, completion, special_tokens=False)
        if tokenizer.eos_token_id is not None:
            completion_ids.append(tokenizer.eos_token_id)
    if max_length is not None:
        prompt_ids, completion_ids = truncate_pair(prompt_ids, completion_ids, max_length)
    return prompt_ids, completion_ids


def encode_preference_pairs(
    tokenizer, examples: Sequence[PreferenceExample], *, max_length: int, chat_template: bool | None = None
) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    """Per example, the (prompt_ids, completion_ids) of its chosen and of its rejected completion."""
    encoded = []
    for index, example in enumerate(examples):
        if example.chosen is None or example.rejected is None:
            raise ValueError(f"preference example {index} lacks chosen or rejected; pairwise training needs both")
        messages = example.extra.get("prompt_messages")
        chosen, rejected = (
            encode_prompt_completion(tokenizer, example.prompt, completion, messages=messages,
                                     chat_template=chat_template, max_length=max_length)
            for completion in (example.chosen, example.rejected)
        )
        encoded.append((chosen, rejected))
    return encoded


def truncate_pair(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit into `max_length` tokens: the prompt keeps its end (at least half the budget when the completion
    is long), the completion keeps its start."""
    if max_length < 2:
        raise ValueError(f"max_length = {max_length}: need at least 2 tokens (one of prompt, one of completion)")
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    keep_prompt = min(len(prompt_ids), max(max_length - len(completion_ids), max_length // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    return prompt_ids, completion_ids[: max_length - len(prompt_ids)]


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate_prompt_completion(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, completion_mask (1 on completion tokens) and
    labels (input_ids, IGNORE_INDEX on prompt and padding). Right padding keeps position ids equal to
    those of the unpadded sequence, so scores do not depend on the batch."""
    length = max(len(p) + len(c) for p, c in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    completion_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (prompt_ids, completion_ids) in enumerate(pairs):
        ids = list(prompt_ids) + list(completion_ids)
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, len(prompt_ids): len(ids)] = 1
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask, "labels": labels}
