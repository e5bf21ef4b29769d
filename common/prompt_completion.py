"""Tokenise prompt + completion pairs one way for SFT, reward models and DPO, and batch them.

A sequence is `prompt_ids + completion_ids`, tokenised apart so the boundary is exact: SFT masks exactly the
prompt tokens, a completion's logprob covers exactly its own tokens, and a reward model trained on these
sequences scores at inference what it saw in training.

- Without a chat template: the prompt gets the tokenizer's special tokens (BOS), the completion none, plus EOS.
  A space joins them when neither side has whitespace at the seam ("The film was" + "great").
- With one (`tokenizer.chat_template`, used by default when the tokenizer has it): the prompt is the rendered
  conversation with the generation prompt, the completion is the rest of the conversation rendered with the
  reply (its end-of-turn tokens included).

Padding: `pad_token_id` is the one rule every batch in the project pads with. Many tokenizers have no pad
token (GPT-2, Pythia) or pad with their EOS (SmolLM2), so the filler's identity never means anything: every
consumer reads the attention mask, never compares ids with the pad id, and the user's tokenizer is never
changed to give it one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from raylign.common.preference_data import PreferenceExample

IGNORE_INDEX = -100


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else 0.

    Only a filler: attention masks say which positions are real, so the id may equal a real token (EOS).
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def uses_chat_template(tokenizer, chat_template: bool | None, field: str = "chat_template") -> bool:
    """None: use the tokenizer's template when it has one. True without one is an error naming `field` and the fix."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        return has_template
    if chat_template and not has_template:
        raise ValueError(
            f"{field} = true, but the tokenizer '{getattr(tokenizer, 'name_or_path', '')}' has no chat template; "
            f"set {field}=false (plain prompt + completion text) or use an instruct model's tokenizer"
        )
    return chat_template


def render_chat(tokenizer, conversation: list[dict], *, add_generation_prompt: bool, field: str = "chat_template") -> str:
    """The conversation rendered by the tokenizer's chat template; a template that rejects it (Gemma refuses a
    system turn) is a ValueError naming the roles, the template's reason and the fix."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        roles = ", ".join(message.get("role", "?") for message in conversation)
        raise ValueError(
            f"{field}: the chat template of '{getattr(tokenizer, 'name_or_path', '')}' rejects a conversation with the "
            f"roles [{roles}]: {error}. Give the data only the roles this template accepts (e.g. fold a system "
            f"prompt into the first user turn), or set {field}=false to use plain text"
        ) from None


def check_chat_template(tokenizer, conversations: Iterable[list[dict]], chat_template: bool | None, field: str) -> None:
    """Before training: when the chat template is in use, render one conversation of each role sequence, so a
    template that rejects the data's roles fails up front with `render_chat`'s message."""
    if not uses_chat_template(tokenizer, chat_template, field):
        return
    seen = set()
    for conversation in conversations:
        roles = tuple(message.get("role") for message in conversation)
        if roles not in seen:
            seen.add(roles)
            render_chat(tokenizer, conversation, add_generation_prompt=roles[-1] != "assistant", field=field)


def _text_ids(tokenizer, text: str, special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special_tokens).input_ids)


def _rendered_prompt(tokenizer, prompt: str, messages: list[dict] | None, field: str) -> tuple[list[dict], str]:
    conversation = messages or [{"role": "user", "content": prompt}]
    return conversation, render_chat(tokenizer, conversation, add_generation_prompt=True, field=field)


def encode_prompt(tokenizer, prompt: str, *, messages: list[dict] | None = None, chat_template: bool | None = None,
                  field: str = "chat_template") -> list[int]:
    """Token ids of a prompt alone (what a policy is asked to continue); never empty. `field` names the
    chat-template setting in errors."""
    if uses_chat_template(tokenizer, chat_template, field):
        ids = _text_ids(tokenizer, _rendered_prompt(tokenizer, prompt, messages, field)[1], special_tokens=False)
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
        conversation, prompt_text = _rendered_prompt(tokenizer, prompt, messages, "chat_template")
        full_text = render_chat(tokenizer, conversation + [{"role": "assistant", "content": completion.strip()}],
                                add_generation_prompt=False)
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
    """Per example, the (prompt_ids, completion_ids) of its chosen and of its rejected completion.

    The prompt is truncated once per pair (to fit the longer completion), so chosen and rejected are always
    scored after exactly the same prompt tokens.
    """
    encoded = []
    for index, example in enumerate(examples):
        if example.chosen is None or example.rejected is None:
            raise ValueError(f"preference example {index} lacks chosen or rejected; pairwise training needs both")
        messages = example.extra.get("prompt_messages")
        (prompt_ids, chosen_ids), (rejected_prompt_ids, rejected_ids) = (
            encode_prompt_completion(tokenizer, example.prompt, completion, messages=messages, chat_template=chat_template)
            for completion in (example.chosen, example.rejected)
        )
        if prompt_ids != rejected_prompt_ids:
            raise RuntimeError(f"preference example {index}: chosen and rejected tokenised the prompt differently")
        prompt_ids, (chosen_ids, rejected_ids) = truncate_prompt_and_completions(prompt_ids, [chosen_ids, rejected_ids], max_length)
        encoded.append(((prompt_ids, chosen_ids), (prompt_ids, rejected_ids)))
    return encoded


def truncate_pair(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into `max_length` tokens (see `truncate_prompt_and_completions`)."""
    prompt_ids, (completion_ids,) = truncate_prompt_and_completions(prompt_ids, [completion_ids], max_length)
    return prompt_ids, completion_ids


def truncate_prompt_and_completions(
    prompt_ids: list[int], completions: list[list[int]], max_length: int
) -> tuple[list[int], list[list[int]]]:
    """Fit the prompt followed by each completion into `max_length` tokens, cutting the prompt once for all.

    The prompt keeps its end (at least half the budget when the longest completion is long); each completion
    keeps its start.
    """
    if max_length < 2:
        raise ValueError(f"max_length = {max_length}: need at least 2 tokens (one of prompt, one of completion)")
    longest = max(len(ids) for ids in completions)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, completions
    keep_prompt = min(len(prompt_ids), max(max_length - longest, max_length // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    return prompt_ids, [ids[: max_length - len(prompt_ids)] for ids in completions]


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
