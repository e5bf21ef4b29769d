"""LLM-as-judge: win/loss/tie of a candidate model's answers against a baseline's, on any OpenAI-compatible endpoint.

Every pair is judged twice, candidate shown first and baseline shown first;
a pair wins or loses only when both orders agree, otherwise it is a tie, so
a judge that prefers whichever answer comes first cannot manufacture a win.
A verdict the parser cannot read is counted and returned with the judge's
reply, never dropped: the pair it belongs to leaves the win rate and shows
up in ``unparseable_pairs``.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Sequence

import httpx

from raylign.common.judge_config import JudgeConfig
from raylign.common.statistics import win_rate_ci

__all__ = ["JudgeClient", "JudgeConfig", "JudgeError", "UnparseableVerdict", "judge_pair", "judge_win_rate", "parse_verdict",
           "tally_judgments"]

Verdict = Literal["A", "B", "tie"]
VERDICTS: tuple[Verdict, ...] = ("A", "B", "tie")
CANDIDATE_FIRST, BASELINE_FIRST = "candidate_first", "baseline_first"
RETRY_STATUSES = {429, 500, 502, 503, 504}

_WHO = r"(?i:response|assistant|answer|output)"
# [[A]], [[B]], [[tie]]; [[C]] is MT-Bench's tie.
_MARKER = re.compile(r"\[\[\s*([AB]|(?i:tie|C))\s*\]\]")
# The whole reply is a label: "A", "**B**", "Tie.", "(A)", "Response B".
_BARE = re.compile(rf"(?:{_WHO}\s+)?([AB]|tie)", re.IGNORECASE)
_STRIP = " \t\n*_`'\".,:;!()[]"
# "Verdict: A", "The winner is Response B", "Final answer: tie", "the verdict is a tie".
_KEYWORD = re.compile(
    rf"(?i:verdict|winner|final answer|answer(?=\s*:)|choice|decision)\s*(?i:is)?\s*[:=-]?\s*[*_`\"'(\[]*\s*"
    rf"(?:{_WHO}\s+|(?i:a)\s+(?=(?i:tie)))?([AB]|(?i:tie))\b"
)
# "A is better", "Response B is clearly better".
_BETTER = re.compile(r"\b([AB])\b[*_`\"')\]]*\s+(?i:is\s+(?:\w+\s+)?(?:better|preferred|superior|stronger))")


class JudgeError(RuntimeError):
    """The judge endpoint failed or answered something that is not an OpenAI-style response."""


class UnparseableVerdict(ValueError):
    """The judge replied, but not with one readable verdict; ``reply`` holds what it wrote."""

    def __init__(self, reply: str):
        super().__init__(f"no single verdict (A, B or tie) in the judge's reply {reply!r}")
        self.reply = reply


def _label(raw: str) -> Verdict:
    raw = raw.strip()
    return raw.upper() if raw.upper() in ("A", "B") else "tie"  # type: ignore[return-value]


def parse_verdict(reply: str) -> Verdict:
    """The verdict in a judge's reply, by the first of these rules that finds any label.

    1. ``[[A]]``, ``[[B]]``, ``[[tie]]`` (or ``[[C]]``) markers, as the default
       template asks for.
    2. The whole reply, stripped of markdown and punctuation, is a label:
       ``A``, ``**B**``, ``Tie.``, ``Response A``.
    3. A label after a verdict keyword: ``Verdict: A``, ``The winner is
       Response B``, ``Final answer: tie``.
    4. ``A is better``, ``Response B is clearly better``.

    Single letters count only in capitals outside rule 2, so the article
    "a" is never read as a vote. A rule that finds two different labels
    ("[[A]] ... [[B]]"), or a reply no rule reads, raises
    :class:`UnparseableVerdict`.
    """
    bare = _BARE.fullmatch(reply.strip(_STRIP))
    rules = (
        [match.group(1) for match in _MARKER.finditer(reply)],
        [bare.group(1)] if bare else [],
        [match.group(1) for match in _KEYWORD.finditer(reply)],
        [match.group(1) for match in _BETTER.finditer(reply)],
    )
    for found in rules:
        labels = {_label(raw) for raw in found}
        if len(labels) == 1:
            return labels.pop()
        if labels:
            break
    raise UnparseableVerdict(reply)


class JudgeClient:
    """One HTTP connection pool to the judge endpoint; ``complete(text)`` returns the judge's reply."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        key = os.environ.get(config.api_key_env)
        self._has_key = bool(key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(headers=headers, timeout=config.timeout)
        self.url = f"{config.base_url}/{'chat/completions' if config.mode == 'chat' else 'completions'}"

    def __enter__(self) -> "JudgeClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _body(self, text: str) -> dict:
        config = self.config
        body: dict = {"model": config.model, "max_tokens": config.max_tokens, "temperature": config.temperature}
        if config.mode == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        if config.constrain_verdict:
            body["structured_outputs"] = {"choice": list(VERDICTS)}
        return body

    def _hint(self, status: int) -> str:
        config = self.config
        if status in (401, 403):
            if not self._has_key:
                return f"; the environment variable {config.api_key_env} (judge.api_key_env) is not set: export the endpoint's API key there"
            return f"; the endpoint refused the key in {config.api_key_env} (judge.api_key_env)"
        if status == 404:
            return f"; check judge.base_url = {config.base_url!r} (it should end in the API version, e.g. /v1) and judge.model = {config.model!r}"
        if status == 400 and config.mode == "chat":
            return "; a base model without a chat template needs judge.mode = 'completions'"
        return ""

    def complete(self, text: str) -> str:
        """POST one request; retries rate limits, server and network errors up to ``max_retries`` times."""
        attempts = self.config.max_retries + 1
        last_error: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(2.0 ** (attempt - 1))
            try:
                response = self._http.post(self.url, json=self._body(text))
            except httpx.TransportError as error:
                last_error, failure = error, f"{type(error).__name__}: {error}"
                continue
            if response.status_code == 200:
                return self._reply_text(response)
            failure = f"HTTP {response.status_code}: {response.text[:500]}"
            if response.status_code not in RETRY_STATUSES:
                raise JudgeError(f"judge request to {self.url} failed with {failure}{self._hint(response.status_code)}")
        raise JudgeError(f"judge request to {self.url} failed after {attempts} attempt(s); last: {failure}") from last_error

    def _reply_text(self, response: httpx.Response) -> str:
        try:
            choice = response.json()["choices"][0]
            text = choice["message"]["content"] if self.config.mode == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise JudgeError(f"judge endpoint {self.url} answered 200 without an OpenAI-style choice: {response.text[:500]}") from error
        return text or ""


def judge_pair(client: JudgeClient, prompt: str, answer_a: str, answer_b: str) -> Verdict:
    """The judge's verdict on ``answer_a`` (shown first) against ``answer_b``; raises :class:`UnparseableVerdict`."""
    text = client.config.prompt_template.format(prompt=prompt, answer_a=answer_a, answer_b=answer_b)
    return parse_verdict(client.complete(text))


def tally_judgments(winners: Sequence[tuple[str, str]]) -> dict:
    """Counts and win rate from each pair's two winners, ``(candidate_first, baseline_first)``.

    Each winner is ``candidate``, ``baseline``, ``tie`` or ``unparseable``.
    A pair is a win (loss) when both orders prefer the candidate (baseline),
    a tie when the orders disagree or both say tie, and unparseable when
    either verdict could not be read. See :func:`judge_win_rate` for the keys.
    """
    judgments = {"candidate": 0, "baseline": 0, "tie": 0, "unparseable": 0}
    outcomes = {"win": 0, "loss": 0, "tie": 0, "unparseable": 0}
    per_pair, agreeing = [], 0
    for pair in winners:
        for winner in pair:
            judgments[winner] += 1
        both = set(pair)
        if "unparseable" in both:
            outcome = "unparseable"
        elif len(both) == 2:
            outcome = "tie"
        else:
            agreeing += 1
            outcome = {"candidate": "win", "baseline": "loss", "tie": "tie"}[both.pop()]
        outcomes[outcome] += 1
        per_pair.append(outcome)
    judged = outcomes["win"] + outcomes["loss"] + outcomes["tie"]
    if judged:
        rate = win_rate_ci(outcomes["win"], outcomes["loss"], outcomes["tie"], ties_as="half")
        win_rate, low, high = rate.rate, rate.interval.low, rate.interval.high
    else:
        win_rate, low, high = None, 0.0, 1.0
    return {
        "pairs": len(per_pair),
        "wins": outcomes["win"],
        "losses": outcomes["loss"],
        "ties": outcomes["tie"],
        "unparseable_pairs": outcomes["unparseable"],
        "judgments": judgments,
        "win_rate": win_rate,
        "ci_low": low,
        "ci_high": high,
        "ties_as": "half",
        "order_agreement": agreeing / judged if judged else None,
        "outcomes": per_pair,
    }


def judge_win_rate(prompts: Sequence[str], candidate: Sequence[str], baseline: Sequence[str], config: JudgeConfig) -> dict:
    """Judge each (prompt, candidate answer, baseline answer) in both orders and count the outcomes.

    Returns a JSON-ready dict:

    - ``pairs``: number of prompts; ``wins`` + ``losses`` + ``ties`` +
      ``unparseable_pairs`` == ``pairs``. A pair is a win (loss) when both
      orders prefer the candidate (baseline), a tie when the orders disagree
      or both say tie, and unparseable when either verdict could not be read.
    - ``judgments``: the 2 x ``pairs`` single verdicts by winner:
      ``candidate``, ``baseline``, ``tie``, ``unparseable``.
    - ``win_rate``: (wins + ties / 2) / (wins + losses + ties), None when no
      pair could be judged; ``ci_low``/``ci_high``: its 95 % Wilson interval
      (``common.statistics.win_rate_ci``), [0, 1] when no pair could be
      judged (the limit of the Wilson interval as n goes to 0).
    - ``order_agreement``: share of readable pairs whose two verdicts agree
      (low means the judge follows position, not content), None when none.
    - ``outcomes``: per pair ``win``/``loss``/``tie``/``unparseable``;
      ``records``: per pair, each order's winner, the outcome, and the judge's
      reply for every unparseable verdict.

    Endpoint failures raise :class:`JudgeError`; nothing is swallowed.
    """
    if not (len(prompts) == len(candidate) == len(baseline)):
        raise ValueError(f"prompts, candidate and baseline must have equal lengths, got {len(prompts)}, {len(candidate)}, {len(baseline)}")
    if not prompts:
        raise ValueError("judge_win_rate needs at least one prompt")
    jobs = [(index, order) for index in range(len(prompts)) for order in (CANDIDATE_FIRST, BASELINE_FIRST)]

    with JudgeClient(config) as client:

        def judge(job: tuple[int, str]) -> tuple[str, str | None]:
            index, order = job
            first, second = (candidate, baseline) if order == CANDIDATE_FIRST else (baseline, candidate)
            try:
                verdict = judge_pair(client, prompts[index], first[index], second[index])
            except UnparseableVerdict as error:
                return "unparseable", error.reply
            if verdict == "tie":
                return "tie", None
            return ("candidate" if (verdict == "A") == (order == CANDIDATE_FIRST) else "baseline"), None

        with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
            results = dict(zip(jobs, pool.map(judge, jobs)))

    summary = tally_judgments([(results[(i, CANDIDATE_FIRST)][0], results[(i, BASELINE_FIRST)][0]) for i in range(len(prompts))])
    records = []
    for index, outcome in enumerate(summary["outcomes"]):
        record: dict = {"index": index, "outcome": outcome}
        for order in (CANDIDATE_FIRST, BASELINE_FIRST):
            winner, reply = results[(index, order)]
            record[order] = winner
            if reply is not None:
                record[f"{order}_reply"] = reply
        records.append(record)
    summary["records"] = records
    return summary
