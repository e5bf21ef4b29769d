"""Data that crosses actor boundaries: prompts, samples, adapter updates.

Plain dataclasses of Python lists so Ray serialises them cheaply and every
actor can read them without importing another actor's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptItem:
    """One prompt to sample K completions for; `seed` makes its samples reproducible."""

    index: int
    text: str
    token_ids: list[int]
    seed: int


@dataclass(frozen=True)
class SamplingSettings:
    samples_per_prompt: int
    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


@dataclass
class Completion:
    """What an engine returns for one sampled completion."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class Sample:
    """One scored-or-to-be-scored completion, tagged with the policy version that produced it."""

    prompt_index: int
    sample_index: int
    prompt: str
    prompt_ids: list[int]
    completion: str
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    policy_version: int
    finish_reason: str
    reward: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterUpdate:
    """A LoRA adapter version in PEFT's on-disk format (file name -> bytes).

    Published once to the object store; every rollout actor reads the same copy.
    """

    version: int
    files: dict[str, bytes]
