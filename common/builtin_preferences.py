"""Built-in offline data sets for the pipeline stages, in the internal `PreferenceExample` schema.

They stand in for the seeds' data sets offline, built from the same vocabulary as the synthetic reviews
(`common.data`), and are deterministic: row i is the same for every run and every `num_rows` ≥ i.

- `builtin:movie-reviews`: SFT data. prompt = a review opening ("Honestly, the plot was"), chosen = the rest
  of the review, extra.text = the whole review. Moods are balanced, as in the RL prompt set.
- `builtin:movie-preferences`: prompt = an opening, chosen = a positive continuation, rejected = a negative one.
  Separable by sentiment words, so a tiny reward model can learn it in a few dozen steps.
- `builtin:movie-sentiment`: IMDB-style rows: prompt = an opening, label 1 (positive) or 0 (negative),
  extra.text = the whole review, which is what a classifier reward model reads.

Every row also has `extra.category`, what its opening is about (`review_category`: overall, story, people,
craft), so per-category evaluation (seed smollm2_orca's three prompt types) has categories offline.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from raylign.common.data import BUILTIN_REVIEWS, MOODS, review_continuation, review_vocabulary, synthetic_prompt
from raylign.common.preference_data import PreferenceExample

BUILTIN_PREFERENCES = "builtin:movie-preferences"
BUILTIN_SENTIMENT = "builtin:movie-sentiment"
DEFAULT_ROWS = 2000


# What an opening's subject is about: the prompt categories of the built-in data.
REVIEW_CATEGORIES = {category: tuple(subjects) for category, subjects in review_vocabulary()["categories"].items()}


def review_category(opening: str) -> str:
    """The category of a review opening ('Honestly, the plot was' -> 'story'), from the subject it names."""
    for category, subjects in REVIEW_CATEGORIES.items():
        if any(f" {subject} " in f" {opening} " for subject in subjects):
            return category
    raise ValueError(f"opening {opening!r} names no subject of the built-in reviews ({len(REVIEW_CATEGORIES)} categories)")


def movie_reviews(num_rows: int = DEFAULT_ROWS, seed: int = 0) -> list[PreferenceExample]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        opening, mood = synthetic_prompt(rng), rng.choice(MOODS)
        rest = review_continuation(rng, mood)
        rows.append(PreferenceExample(prompt=opening, chosen=rest, extra={"text": f"{opening} {rest}", "mood": mood,
                                                                          "category": review_category(opening)}))
    return rows


def movie_preferences(num_rows: int = DEFAULT_ROWS, seed: int = 0) -> list[PreferenceExample]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        opening = synthetic_prompt(rng)
        rows.append(PreferenceExample(
            prompt=opening, chosen=review_continuation(rng, "positive"), rejected=review_continuation(rng, "negative"),
            extra={"category": review_category(opening)},
        ))
    return rows


def movie_sentiment(num_rows: int = DEFAULT_ROWS, seed: int = 0) -> list[PreferenceExample]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        opening, label = synthetic_prompt(rng), int(rng.random() < 0.5)
        rest = review_continuation(rng, "positive" if label else "negative")
        rows.append(PreferenceExample(prompt=opening, label=label, extra={"text": f"{opening} {rest}",
                                                                          "category": review_category(opening)}))
    return rows


BUILTIN_DATASETS: dict[str, Callable[..., list[PreferenceExample]]] = {
    BUILTIN_REVIEWS: movie_reviews,
    BUILTIN_PREFERENCES: movie_preferences,
    BUILTIN_SENTIMENT: movie_sentiment,
}


def load_builtin_examples(name: str, max_rows: int | None = None) -> list[PreferenceExample]:
    """The first `max_rows` (default 2000) rows of a built-in data set."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"data source '{name}' is not a built-in data set; use one of {', '.join(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[name](num_rows=max_rows or DEFAULT_ROWS)
