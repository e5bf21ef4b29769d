"""Prompt and text data: the built-in synthetic movie reviews and `datasets` loading.

The built-in set stands in for IMDB-style data offline. It is generated
deterministically, written as JSON lines, and read back through `datasets`
exactly like a user's own `json` files, so the real loading path is the one tested.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from raylign.common.storage import local_copy

BUILTIN_REVIEWS = "builtin:movie-reviews"

_SUBJECTS = [
    "the movie", "this film", "the acting", "the story", "the plot", "the ending", "the director",
    "the cast", "the music", "the script", "the lead actor", "the dialogue", "the first half",
    "the soundtrack", "the camera work", "the villain", "the sequel", "the characters",
]
_OPENERS = [
    "I watched this last night and", "Honestly,", "To be fair,", "After two hours,", "In my opinion,",
    "My friends agreed that", "I have to say", "From the start,", "Overall,", "By the end,",
]
_POSITIVE = [
    "great", "wonderful", "beautiful", "brilliant", "excellent", "charming", "funny", "amazing",
    "good", "lovely", "delightful", "fantastic", "moving", "fun", "perfect",
]
_NEGATIVE = [
    "bad", "boring", "awful", "terrible", "dull", "weak", "stupid", "ugly", "sad", "poor",
    "annoying", "horrible", "painful", "messy", "disappointing",
]
_NEUTRAL = ["long", "quiet", "slow", "simple", "strange", "different", "old", "dark", "short", "loud"]
_VERBS = ["was", "felt", "seemed", "looked", "sounded"]
_POSITIVE_TAILS = [
    "I loved every minute", "I would watch it again", "a real joy to watch", "I enjoyed it a lot",
    "highly recommended", "the best film this year",
]
_NEGATIVE_TAILS = [
    "I hated most of it", "a waste of time", "I would not watch it again", "I was bored the whole time",
    "not worth the ticket", "the worst film this year",
]


def _sentence(rng: random.Random, mood: str) -> str:
    subject = rng.choice(_SUBJECTS)
    verb = rng.choice(_VERBS)
    words = {"positive": _POSITIVE, "negative": _NEGATIVE, "neutral": _NEUTRAL}[mood]
    adjective = rng.choice(words)
    if rng.random() < 0.4:
        adjective = f"{adjective} and {rng.choice(words)}"
    return f"{subject} {verb} {adjective}"


def synthetic_review(rng: random.Random) -> str:
    """One short review; moods are balanced so a sentiment reward starts near zero."""
    return synthetic_review_with_mood(rng, rng.choice(["positive", "negative", "neutral"]))


def synthetic_review_with_mood(rng: random.Random, mood: str) -> str:
    """One short review whose first sentence (and usually the rest) has `mood`: positive, negative or neutral."""
    parts = [f"{rng.choice(_OPENERS)} {_sentence(rng, mood)}."]
    second_mood = mood if rng.random() < 0.6 else rng.choice(["positive", "negative", "neutral"])
    parts.append(_sentence(rng, second_mood).capitalize() + ".")
    if mood != "neutral" and rng.random() < 0.5:
        tails = _POSITIVE_TAILS if mood == "positive" else _NEGATIVE_TAILS
        parts.append(rng.choice(tails).capitalize() + ".")
    return " ".join(parts)


def synthetic_prompt(rng: random.Random) -> str:
    """A review opening that the policy continues."""
    subject = rng.choice(_SUBJECTS)
    return f"{rng.choice(_OPENERS)} {subject} {rng.choice(_VERBS)}"


def review_sentence(rng: random.Random, mood: str) -> str:
    """One 'subject verb adjective' clause in `mood` ('positive', 'negative' or 'neutral'), as the reviews use."""
    return _sentence(rng, mood)


def review_vocabulary() -> dict[str, list[str]]:
    """Copies of the word lists the reviews are built from, by role, for other built-in data sets."""
    return {
        "openers": list(_OPENERS), "subjects": list(_SUBJECTS), "verbs": list(_VERBS),
        "positive": list(_POSITIVE), "negative": list(_NEGATIVE), "neutral": list(_NEUTRAL),
        "positive_tails": list(_POSITIVE_TAILS), "negative_tails": list(_NEGATIVE_TAILS),
    }


def write_builtin_reviews(directory: str | Path, seed: int = 0, num_texts: int = 4000, num_prompts: int = 512) -> dict[str, Path]:
    """Write `texts.jsonl` (SFT corpus) and `prompts.jsonl` with train/val/test splits (6:1:1, disjoint)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {"texts": directory / "texts.jsonl", "prompts": directory / "prompts.jsonl"}
    with paths["texts"].open("w") as f:
        for _ in range(num_texts):
            f.write(json.dumps({"text": synthetic_review(rng)}) + "\n")
    prompts = sorted({synthetic_prompt(rng) for _ in range(num_prompts * 4)})
    rng.shuffle(prompts)
    prompts = prompts[:num_prompts]
    with paths["prompts"].open("w") as f:
        for index, prompt in enumerate(prompts):
            split = {0: "test", 1: "val"}.get(index % 8, "train")
            f.write(json.dumps({"prompt": prompt, "split": split}) + "\n")
    return paths


def builtin_corpus_texts(seed: int = 0, num_texts: int = 4000) -> list[str]:
    rng = random.Random(seed)
    return [synthetic_review(rng) for _ in range(num_texts)]


def _load_rows(source: str, split: str, data_dir: str | Path | None, text_file: bool):
    """A `datasets` split: local json/jsonl (rows filtered by a `split` column when present) or a hub dataset."""
    import datasets

    if source == BUILTIN_REVIEWS:
        if data_dir is None:
            raise ValueError("data_dir is required to materialise the built-in data")
        paths = write_builtin_reviews(data_dir)
        source = str(paths["texts"] if text_file else paths["prompts"])
    source = local_copy(source)
    if source.endswith((".json", ".jsonl")):
        if not Path(source).is_file():
            raise ValueError(f"data file '{source}' does not exist; give an existing .json/.jsonl file or 'builtin:movie-reviews'")
        dataset = datasets.load_dataset("json", data_files=source, split="train")
        if "split" in dataset.column_names:
            dataset = dataset.filter(lambda row: row["split"] == split)
        return source, dataset
    return source, datasets.load_dataset(source, split=split)


def load_columns(source: str, fields: list[str], split: str = "train", data_dir: str | Path | None = None) -> dict[str, list]:
    """Columns `fields` of a prompt set, in row order (the same rows `load_text_column` returns)."""
    source, dataset = _load_rows(source, split, data_dir, text_file=False)
    missing = [f for f in fields if f not in dataset.column_names]
    if missing:
        raise ValueError(
            f"data.extra_fields: columns {missing} not found in '{source}' (columns: {dataset.column_names}); "
            "list only columns the data has"
        )
    return {field: list(dataset[field]) for field in fields}


def load_text_column(source: str, field: str, split: str = "train", data_dir: str | Path | None = None) -> list[str]:
    """Load one text column through `datasets`: local json/jsonl, or a hub dataset name.

    For local files with a `split` column, rows are filtered to `split`.
    """
    source, dataset = _load_rows(source, split, data_dir, text_file=field != "prompt")
    if field not in dataset.column_names:
        raise ValueError(
            f"column '{field}' not found in '{source}' (columns: {dataset.column_names}); "
            "set data.prompt_field / sft.text_field to one of them"
        )
    texts = list(dataset[field])
    empty = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        raise ValueError(f"'{source}' column '{field}' has {len(empty)} empty or non-text rows (first at row {empty[0]}); clean the data")
    return texts
