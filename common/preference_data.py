"""Preference and prompt data from each seed's data set, in one internal schema.

Every adapter turns one raw row into a `PreferenceExample`:

- `prompt`: the text a policy continues (for conversations, the shared context);
- `chosen` / `rejected`: the preferred and dispreferred completions, or None;
- `label`: a class label (IMDB sentiment), or None;
- `extra`: everything else worth keeping (scores, system prompt, the prompt as a
  message list under `prompt_messages` for chat templates, the full review text).

For `hh-rlhf` the split is exact: `prompt + chosen` is the raw `chosen` string.
Splits are assigned by a hash of the prompt, so they are deterministic,
independent of row order, and a prompt never lands in two of them.

Each format declares its held-out **test split** (`TEST_SPLITS`): the source's own test split where it has one
(IMDB `test`, HH-RLHF `test`, UltraFeedback `test_prefs`), else a deterministic hold-out by prompt hash
(`hold_out_test`: Orca, the built-in data, local files), salted apart from the training fractions so that every
stage reading a source holds out the same prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raylign.common.storage import local_copy


@dataclass
class PreferenceExample:
    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    label: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def split_prompt(self) -> str:
        """The prompt splits are assigned by: the source's own prompt (`extra.source_prompt`) when a transform
        rewrote it (GenRM rows), so every stage reading one source splits its prompts alike."""
        return self.extra.get("source_prompt") or self.prompt

    def prompt_messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages: the parsed conversation when the source has one, else one user turn."""
        messages = self.extra.get("prompt_messages")
        return list(messages) if messages else [{"role": "user", "content": self.prompt}]


# ----- adapters: one raw row -> PreferenceExample -----

IMDB_PROMPT_MAX_CHARS = 200
# A sentence ends at . ! or ? followed by a capital or a quote, so "U.S. customs" stays whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def imdb_prompt(text: str, max_chars: int = IMDB_PROMPT_MAX_CHARS) -> str:
    """First two sentences when they fit in `max_chars`, else the first, cut at a word boundary to `max_chars`."""
    sentences = _SENTENCE_END.split(" ".join(text.split()))
    prompt = sentences[0]
    if len(sentences) > 1 and len(prompt) + 1 + len(sentences[1]) <= max_chars:
        prompt = f"{prompt} {sentences[1]}"
    if len(prompt) > max_chars:
        cut = prompt[: max_chars + 1].rsplit(" ", 1)[0]
        prompt = cut if cut and len(cut) <= max_chars else prompt[:max_chars]
    return prompt


def adapt_imdb(row: Mapping[str, Any]) -> PreferenceExample:
    """`imdb` / `stanfordnlp/imdb`: {text, label}. The prompt is the review's opening; the full text stays in extra."""
    text = " ".join(_HTML_BREAK.sub(" ", _require_text(row, "text")).split())
    return PreferenceExample(prompt=imdb_prompt(text), label=int(row["label"]), extra={"text": text})


HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(conversation: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user: a}, {assistant: b}]; a trailing empty turn is dropped."""
    parts = _HH_TURN.split(conversation)
    messages = [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    if messages and not messages[-1]["content"]:
        messages.pop()
    return messages


def adapt_hh_rlhf(row: Mapping[str, Any]) -> PreferenceExample:
    """`Anthropic/hh-rlhf`: {chosen, rejected}, each a whole dialogue.

    The prompt is the longest shared prefix of the two that ends at an '\\n\\nAssistant:' marker; the replies are
    what follows it. That is the final reply when the dialogues share their context (nearly every row), and the
    diverging tail of turns in the few rows where they do not.
    """
    chosen, rejected = _require_text(row, "chosen"), _require_text(row, "rejected")
    shared = os.path.commonprefix([chosen, rejected])
    marker = shared.rfind(HH_ASSISTANT)
    prompt = shared[: marker + len(HH_ASSISTANT)] if marker >= 0 else ""
    return PreferenceExample(
        prompt=prompt, chosen=chosen[len(prompt):], rejected=rejected[len(prompt):],
        extra={"prompt_messages": hh_messages(prompt)},
    )


def _final_assistant_reply(messages: Any, column: str) -> str:
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], Mapping):
        raise ValueError(f"column '{column}' must be a non-empty list of {{role, content}} messages, got {type(messages).__name__}")
    last = messages[-1]
    if last.get("role") != "assistant":
        raise ValueError(f"column '{column}' must end with an assistant message, it ends with role '{last.get('role')}'")
    return last["content"]


def adapt_ultrafeedback(row: Mapping[str, Any]) -> PreferenceExample:
    """`HuggingFaceH4/ultrafeedback_binarized`: {prompt, prompt_id, chosen/rejected message lists, score_chosen/_rejected}."""
    chosen = _final_assistant_reply(row.get("chosen"), "chosen")
    extra = {
        "prompt_messages": [{"role": m["role"], "content": m["content"]} for m in row["chosen"][:-1]],
        "score_chosen": float(row["score_chosen"]),
        "score_rejected": float(row["score_rejected"]),
    }
    if row.get("prompt_id") is not None:
        extra["prompt_id"] = row["prompt_id"]
    return PreferenceExample(
        prompt=_require_text(row, "prompt"),
        chosen=chosen,
        rejected=_final_assistant_reply(row.get("rejected"), "rejected"),
        extra=extra,
    )


def adapt_orca(row: Mapping[str, Any]) -> PreferenceExample:
    """`Intel/orca_dpo_pairs`: {system, question, chosen, rejected}. The system prompt becomes the first chat message."""
    question = _require_text(row, "question")
    system = (row.get("system") or "").strip()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return PreferenceExample(
        prompt=question, chosen=_require_text(row, "chosen"), rejected=_require_text(row, "rejected"),
        extra={"system": system, "prompt_messages": messages},
    )


_SCHEMA_FIELDS = ("prompt", "chosen", "rejected", "label")


def adapt_generic(row: Mapping[str, Any], columns: Mapping[str, str] | None = None) -> PreferenceExample:
    """Generic JSONL: `prompt` (required), `chosen`, `rejected`, `label` (optional); every other column goes to extra.

    `columns` renames source columns onto the schema, e.g. {"prompt": "question"}. A column named `extra`
    holding an object (what `write_preference_jsonl` writes) is merged into extra.
    """
    columns = dict(columns or {})
    source = {name: columns.get(name, name) for name in _SCHEMA_FIELDS}
    values = {name: row.get(column) for name, column in source.items()}
    if not isinstance(values["prompt"], str):
        raise ValueError(f"column '{source['prompt']}' (the prompt) is missing or not text; "
                         f"map the prompt column with columns={{'prompt': '<name>'}}")
    for name in ("chosen", "rejected"):
        if values[name] is not None and not isinstance(values[name], str):
            raise ValueError(f"column '{source[name]}' must be text, got {type(values[name]).__name__}")
    used = set(source.values()) | {"extra", "split"}
    extra = {key: value for key, value in row.items() if key not in used}
    if isinstance(row.get("extra"), Mapping):
        extra.update({key: value for key, value in row["extra"].items() if value is not None})
    label = values["label"]
    return PreferenceExample(
        prompt=values["prompt"], chosen=values["chosen"], rejected=values["rejected"],
        label=None if label is None else int(label), extra=extra,
    )


# Seed gemma_ultrafeedback's GenRM-style SFT rows (its download_data.py): the user turn holds the prompt and the
# chosen response followed by an instruction to rate it; the assistant turn is the score of the chosen response.
GENRM_INSTRUCTION = "Analyze the quality of the assistant's response above and rate it on a scale of 1 to 10."
GENRM_VERDICT = "Score: {score:.1f}/10. The response is helpful, harmless, and honest."
# How a judgement is read back (the seed's regex): the first "Score: X/10" of a reply.
GENRM_SCORE = re.compile(r"Score:\s*([0-9]+(?:\.[0-9]+)?)/10")


def genrm_user_turn(prompt: str, response: str) -> str:
    """The GenRM user message: the conversation to rate, then the instruction."""
    return f"User: {prompt}\n\nAssistant: {response}\n\n{GENRM_INSTRUCTION}"


def parse_genrm_score(reply: str) -> float | None:
    """The score of a GenRM judgement ('Score: 7.5/10. ...' -> 7.5), None when the reply holds no score."""
    match = GENRM_SCORE.search(reply)
    return float(match.group(1)) if match else None


def adapt_ultrafeedback_genrm(row: Mapping[str, Any]) -> PreferenceExample:
    """`HuggingFaceH4/ultrafeedback_binarized` as GenRM SFT data: prompt = 'User: {prompt}\\n\\nAssistant:
    {chosen}\\n\\n' + the rating instruction (one user turn), chosen = 'Score: {score_chosen:.1f}/10. ...'.
    Only the chosen response and its score are used, as in the seed; extra.score keeps the number, and
    extra.source_prompt the original prompt, which the splits hash (the same rows as the other formats' splits)."""
    example = adapt_ultrafeedback(row)
    user = genrm_user_turn(example.prompt, example.chosen)
    score = example.extra["score_chosen"]
    return PreferenceExample(
        prompt=user, chosen=GENRM_VERDICT.format(score=score),
        extra={"score": score, "source_prompt": example.prompt, "prompt_messages": [{"role": "user", "content": user}],
               **({"prompt_id": example.extra["prompt_id"]} if "prompt_id" in example.extra else {})},
    )


def _require_text(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise ValueError(f"column '{column}' is missing or not text (got {type(value).__name__})")
    return value


ADAPTERS: dict[str, Callable[..., PreferenceExample]] = {
    "imdb": adapt_imdb,
    "hh-rlhf": adapt_hh_rlhf,
    "ultrafeedback": adapt_ultrafeedback,
    "orca": adapt_orca,
    "ultrafeedback-genrm": adapt_ultrafeedback_genrm,
    "jsonl": adapt_generic,
}
# Hub ids (lower-cased) -> format, and the split each reads by default.
HUB_FORMATS = {
    "imdb": "imdb",
    "stanfordnlp/imdb": "imdb",
    "anthropic/hh-rlhf": "hh-rlhf",
    "huggingfaceh4/ultrafeedback_binarized": "ultrafeedback",
    "intel/orca_dpo_pairs": "orca",
}
DEFAULT_SPLITS = {"ultrafeedback": "train_prefs", "ultrafeedback-genrm": "train_prefs"}
# Each format's held-out test split on the hub; None: the source has none, so the test prompts are a
# deterministic hold-out (`hold_out_test`). Local files are held out too unless a stage names their test split.
TEST_SPLITS: dict[str, str | None] = {
    "imdb": "test",
    "hh-rlhf": "test",
    "ultrafeedback": "test_prefs",
    "ultrafeedback-genrm": "test_prefs",
    "orca": None,
    "jsonl": None,
}
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def detect_format(columns: Iterable[str]) -> str:
    """Guess the format of a local file from its column names."""
    columns = set(columns)
    if {"system", "question", "chosen", "rejected"} <= columns:
        return "orca"
    if {"prompt", "chosen", "rejected", "score_chosen"} <= columns:
        return "ultrafeedback"
    if {"text", "label"} <= columns and "prompt" not in columns:
        return "imdb"
    if {"chosen", "rejected"} <= columns and "prompt" not in columns:
        return "hh-rlhf"
    if "prompt" in columns:
        return "jsonl"
    raise ValueError(f"cannot tell the format from the columns {sorted(columns)}; pass format= one of {', '.join(ADAPTERS)}")


def resolve_format(source: str, format: str) -> str:
    if format == "auto":
        return HUB_FORMATS.get(source.lower(), "auto")
    name = HUB_FORMATS.get(format.lower(), format)
    if name not in ADAPTERS:
        raise ValueError(f"format = '{format}' is unknown; choose one of auto, {', '.join(ADAPTERS)} (or a hub id: {', '.join(HUB_FORMATS)})")
    return name


def _load_rows(source: str, split: str | None):
    import datasets

    source = local_copy(source)
    suffix = Path(source).suffix.lower()
    if suffix in _LOCAL_BUILDERS or Path(source).is_file():
        if not Path(source).is_file():
            raise ValueError(f"data file '{source}' does not exist; give an existing .json/.jsonl/.parquet/.csv file or a hub id")
        if suffix not in _LOCAL_BUILDERS:
            raise ValueError(f"data file '{source}' has suffix '{suffix}'; use one of {', '.join(_LOCAL_BUILDERS)}")
        rows = datasets.load_dataset(_LOCAL_BUILDERS[suffix], data_files=source, split="train")
        if split is not None and "split" in rows.column_names:
            rows = rows.filter(lambda row: row["split"] == split)
        return rows
    try:
        return datasets.load_dataset(source, split=split or "train")
    except Exception as error:
        raise RuntimeError(
            f"could not load '{source}' (split '{split or 'train'}') from the Hugging Face Hub: {error}. "
            "Check the name and split, or, without a network, point at a local .jsonl file in the same schema "
            "(tests/fixtures/ has one per format)"
        ) from error


def load_preference_data(
    source: str,
    format: str = "auto",
    split: str | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    max_rows: int | None = None,
) -> list[PreferenceExample]:
    """Load `source` (a hub id, or a local .json/.jsonl/.parquet/.csv file) through `datasets` and adapt every row.

    `format` is one of `ADAPTERS` or 'auto' (from the hub id, else from a local file's columns). `split` is the
    source's split (hub), or the value of a local file's `split` column to keep (all rows when it has none);
    None reads the format's default ('train', 'train_prefs' for ultrafeedback). `columns` renames columns for
    the generic format. `max_rows` keeps the first N rows.
    """
    name = resolve_format(source, format)
    rows = _load_rows(source, split if split is not None else DEFAULT_SPLITS.get(name))
    if name == "auto":
        name = detect_format(rows.column_names)
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    adapter = ADAPTERS[name]
    examples = []
    for index, row in enumerate(rows):
        try:
            examples.append(adapter(row, columns) if name == "jsonl" else adapter(row))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"'{source}' row {index} does not fit the '{name}' format: {error}") from error
    return examples


def write_preference_jsonl(path: str | Path, examples: Iterable[PreferenceExample], split: str | None = None) -> Path:
    """Write examples in the generic format (extra nested under 'extra'), readable back with format='jsonl'."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for example in examples:
            record = asdict(example)
            if split is not None:
                record["split"] = split
            f.write(json.dumps(record) + "\n")
    return path


# ----- disjoint splits -----

# Seed grade_vs_policy_gradient_imdb: RM 5,000 / policy 10,000 / val 2,000 of the 25,000 train reviews; test = IMDB test.
IMDB_SEED_FRACTIONS = {"rm": 0.2, "policy": 0.4, "val": 0.08}


def prompt_key(prompt: str) -> str:
    """What makes two prompts 'the same' for leakage: equal after collapsing whitespace."""
    return " ".join(prompt.split())


# The hold-out has its own salt: which prompts are test prompts does not depend on a stage's fractions.
TEST_HOLDOUT_SALT = "raylign-test"


def declared_test_split(source: str, format: str = "auto") -> str | None:
    """The source's own held-out test split (IMDB 'test', HH-RLHF 'test', UltraFeedback 'test_prefs'), or None
    when it has none and the test prompts are held out by hash (Orca, local files, unknown formats)."""
    name = resolve_format(source, format)
    is_local = Path(source).suffix.lower() in _LOCAL_BUILDERS or Path(source).is_file()
    return None if is_local else TEST_SPLITS.get(name)


def hold_out_test(examples: Sequence[PreferenceExample], fraction: float) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(rest, test): the rows whose prompt hashes below `fraction` (salted apart from the training splits) are
    the test split of a source without one. Deterministic and independent of row order; every row of a prompt
    goes to the same side."""
    if not 0 < fraction < 1:
        raise ValueError(f"test hold-out fraction = {fraction}: must be in (0, 1)")
    rest, test = [], []
    for example in examples:
        (test if prompt_bucket(example.split_prompt, TEST_HOLDOUT_SALT) < fraction else rest).append(example)
    return rest, test


def prompt_bucket(prompt: str, salt: str = "raylign") -> float:
    """A number in [0, 1) fixed by the prompt (and salt) alone."""
    digest = hashlib.sha256(f"{salt}\0{prompt_key(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_prompt(
    examples: Sequence[PreferenceExample],
    fractions: Mapping[str, float],
    *,
    salt: str = "raylign",
    fixed: Mapping[str, Sequence[PreferenceExample]] | None = None,
) -> dict[str, list[PreferenceExample]]:
    """Assign each example to a named split by the hash of its prompt.

    A split's share is about its fraction; fractions may sum to less than 1 (the rest is unused). Every row of a
    prompt goes to the same split. `fixed` splits (e.g. {'test': rows of the source's test split}) are kept as
    given, and rows whose prompt appears in one of them are dropped from the others. Rows keep their input order.
    """
    fixed = dict(fixed or {})
    for name, fraction in fractions.items():
        if not 0 < fraction <= 1:
            raise ValueError(f"split fraction {name} = {fraction}: must be in (0, 1]")
        if name in fixed:
            raise ValueError(f"split '{name}' is both a fraction and a fixed split; give it once")
    total = sum(fractions.values())
    if total > 1 + 1e-9:
        raise ValueError(f"split fractions {dict(fractions)} sum to {total:.3f}; they must sum to at most 1")
    reserved = {prompt_key(example.split_prompt) for rows in fixed.values() for example in rows}
    bounds, upper = [], 0.0
    for name, fraction in fractions.items():
        upper += fraction
        bounds.append((upper, name))
    splits: dict[str, list[PreferenceExample]] = {name: [] for name in fractions}
    for example in examples:
        if prompt_key(example.split_prompt) in reserved:
            continue
        bucket = prompt_bucket(example.split_prompt, salt)
        for upper, name in bounds:
            if bucket < upper:
                splits[name].append(example)
                break
    splits.update({name: list(rows) for name, rows in fixed.items()})
    check_disjoint_splits(splits)
    return splits


def check_disjoint_splits(splits: Mapping[str, Sequence[PreferenceExample]]) -> None:
    """Raise ValueError naming the prompt and both splits if any prompt appears in two splits."""
    owner: dict[str, str] = {}
    for name, rows in splits.items():
        for example in rows:
            key = prompt_key(example.split_prompt)
            first = owner.setdefault(key, name)
            if first != name:
                raise ValueError(
                    f"prompt {key[:80]!r} appears in splits '{first}' and '{name}'; splits must be disjoint "
                    "(build them with split_by_prompt, passing held-out rows as fixed=)"
                )
