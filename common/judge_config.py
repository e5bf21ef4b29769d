"""Configuration of the LLM judge (`actors/judge.py`).

It lives in `common/` so the run config can nest it (imports flow into
`common/`, never out of it); `actors/judge.py` re-exports it.
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_JUDGE_TEMPLATE = (
    "Please act as an impartial judge and compare two responses to the user prompt below. "
    "Choose the response that is more helpful, relevant, accurate and well written. "
    "Do not let the order of the responses or their length influence you. "
    "Reply with exactly one verdict: [[A]] if response A is better, [[B]] if response B is better, "
    "or [[tie]] if they are equally good.\n\n"
    "[Prompt]\n{prompt}\n\n[Response A]\n{answer_a}\n\n[Response B]\n{answer_b}\n\nVerdict:"
)
TEMPLATE_FIELDS = ("prompt", "answer_a", "answer_b")


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base_url: str = Field(
        ...,
        description=(
            "OpenAI-compatible API root including the version, e.g. 'https://api.openai.com/v1' or "
            "'http://127.0.0.1:8000/v1' for a local vLLM server; requests go to {base_url}/chat/completions "
            "or {base_url}/completions."
        ),
    )
    model: str = Field(..., description="Judge model name as the endpoint knows it (the 'model' field of each request).")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description=(
            "Name of the environment variable holding the API key (the key itself never goes in a config). "
            "Unset is fine for local servers that need no key: requests then carry no Authorization header."
        ),
    )
    mode: Literal["chat", "completions"] = Field(
        "chat",
        description=(
            "'chat': the filled template is one user message to /chat/completions (instruction-tuned judges). "
            "'completions': the filled template is the raw prompt to /completions (base models without a chat template)."
        ),
    )
    max_tokens: int = Field(16, ge=1, description="Most tokens the judge may write per verdict.")
    temperature: float = Field(0.0, ge=0.0, description="Judge sampling temperature; 0 makes verdicts repeatable.")
    timeout: float = Field(60.0, gt=0.0, description="Seconds to wait for one judge response before the request fails.")
    max_retries: int = Field(
        3, ge=0, description="Retries of a request that hit a rate limit (429), a server error (5xx) or a network error, with 1, 2, 4, ... s back-off."
    )
    concurrency: int = Field(4, ge=1, description="Judge requests in flight at once.")
    constrain_verdict: bool = Field(
        False,
        description=(
            "vLLM servers only: ask the server to restrict the verdict to exactly 'A', 'B' or 'tie' "
            "(vLLM's structured_outputs choice extension; other APIs reject the unknown field)."
        ),
    )
    prompt_template: str = Field(
        DEFAULT_JUDGE_TEMPLATE,
        description=(
            "Judge prompt with the placeholders {prompt}, {answer_a} and {answer_b} (Python format syntax; "
            "write other braces as {{ and }}). It should ask for [[A]], [[B]] or [[tie]]."
        ),
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url = {value!r} must start with http:// or https://, e.g. 'http://127.0.0.1:8000/v1'")
        return value.rstrip("/")

    @field_validator("prompt_template")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as error:
            raise ValueError(f"prompt_template is not a valid format string ({error}); write literal braces as {{{{ and }}}}") from None
        missing = [name for name in TEMPLATE_FIELDS if name not in names]
        unknown = sorted(names - set(TEMPLATE_FIELDS))
        if missing or unknown:
            raise ValueError(
                f"prompt_template must use exactly the placeholders {{prompt}}, {{answer_a}}, {{answer_b}}; "
                f"missing {missing}, unknown {unknown}"
            )
        return value
