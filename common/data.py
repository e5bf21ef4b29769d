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

# What an opening's subject is about: the prompt categories of the built-in data (see builtin_preferences).
# No subject carries sentiment of its own in VADER ('the villain', 'the hero', 'the humour' would).
_SUBJECTS_BY_CATEGORY = {
    "overall": [
        "the movie", "this film", "the sequel", "the first half", "the ending", "the second half", "the opening scene",
        "the final act", "the pacing", "the premise", "the tone", "the climax", "the middle part", "the last scene",
    ],
    "story": [
        "the story", "the plot", "the script", "the dialogue", "the characters", "the twist", "the writing",
        "the subplot", "the big reveal", "the backstory", "the central mystery", "the side characters",
    ],
    "people": [
        "the acting", "the director", "the cast", "the lead actor", "the lead actress", "the young cast",
        "the narrator", "the young star", "the sidekick", "the detective", "the old man", "the performances",
    ],
    "craft": [
        "the music", "the soundtrack", "the camera work", "the costumes", "the editing", "the lighting",
        "the sound design", "the effects", "the set design", "the score", "the visuals", "the chase scenes",
        "the animation", "the colours",
    ],
}
_SUBJECTS = [subject for subjects in _SUBJECTS_BY_CATEGORY.values() for subject in subjects]
_PLURAL_SUBJECTS = {
    "the characters", "the performances", "the costumes", "the effects", "the visuals", "the chase scenes",
    "the colours", "the side characters",
}
# Openers name no subject: a prompt's category comes from the one subject it names.
_OPENERS = [
    "I watched this last night and", "Honestly,", "To be fair,", "After two hours,", "In my opinion,",
    "My friends agreed that", "I have to say", "From the start,", "Overall,", "By the end,", "If you ask me,",
    "On a second viewing,", "Looking back,", "I went in knowing nothing and", "My sister thought", "Frankly,",
    "On the whole,", "I must say", "In the end,", "Right away,", "At the cinema,", "As far as I can tell,",
    "My dad said", "I think", "It seems to me that", "For me,", "Going in,", "Without spoiling anything,",
]
_POSITIVE = [
    "great", "wonderful", "beautiful", "brilliant", "excellent", "charming", "funny", "amazing", "good", "lovely",
    "delightful", "fantastic", "fun", "perfect", "superb", "clever", "stunning", "inspiring", "fresh", "smart",
    "sweet", "impressive", "entertaining", "enjoyable", "thrilling", "hilarious", "powerful", "elegant", "gorgeous",
    "heartfelt", "engaging", "pleasant", "nice", "rich", "outstanding", "splendid", "terrific", "remarkable",
    "creative", "satisfying", "exciting", "warm",
]
_NEGATIVE = [
    "bad", "boring", "awful", "terrible", "dull", "weak", "stupid", "ugly", "sad", "poor", "annoying", "horrible",
    "painful", "messy", "disappointing", "lazy", "dreadful", "pathetic", "tired", "irritating", "unpleasant",
    "miserable", "frustrating", "ridiculous", "lame", "depressing", "lousy", "crude", "dumb", "nasty", "grim",
    "confusing", "awkward", "worse",
]
_NEUTRAL = [
    "long", "quiet", "slow", "simple", "different", "old", "dark", "short", "loud", "familiar", "busy", "plain",
    "unusual", "modern", "small", "big", "brief", "dense", "heavy", "subtle", "traditional", "ordinary", "fast",
    "young", "late", "formal", "low-key", "wordy", "cold",
]
# 'was'/'were' agree with the subject; the rest read the same for both.
_VERBS = ["was", "felt", "seemed", "looked", "sounded", "turned out", "came across as", "got", "stayed", "became"]
# Intensifiers and hedges are sentiment-free in VADER; its boosters ('really', 'so') only scale the adjective.
_ADVERBS = [
    "really", "quite", "so", "very", "rather", "fairly", "somewhat", "a bit", "a little", "simply", "utterly",
    "totally", "mostly", "incredibly", "extremely", "oddly", "almost",
]
# What 'it had a clever ...' names.
_NOUNS = ["story", "cast", "score", "ending", "look", "feel", "pace", "tone", "premise", "finale", "opening", "lead",
          "script", "middle"]
# Verdicts, by mood; each is signed like its mood in VADER, or neutral there ('I would not watch it again').
_TAILS = {
    "positive": [
        "I loved every minute", "I would watch it again", "a real joy to watch", "I enjoyed it a lot",
        "highly recommended", "the best film this year", "I laughed all the way through", "worth every penny",
        "I want to see it again", "a treat from start to finish", "I left the cinema smiling",
        "a lovely way to spend an evening", "easily a favorite of mine", "I smiled the whole way through",
        "a pleasure from start to finish", "I would happily watch it again",
    ],
    "negative": [
        "I hated most of it", "a waste of time", "I would not watch it again", "I was bored the whole time",
        "not worth the ticket", "the worst film this year", "I fell asleep halfway", "I hated the ending",
        "I left feeling cheated", "a mess from start to finish", "I regret seeing it", "I would not recommend it",
        "a dull way to spend an evening", "a sad waste of talent",
    ],
    "neutral": [
        "it runs about two hours", "I saw it on a Tuesday", "it is out on disc now", "it is in cinemas this week",
        "make of that what you will", "your mileage may vary",
    ],
}
_CONNECTIVES = {"same": ["Also,", "Plus,", "And", "In fact,", "What is more,", "Besides,"],
                "other": ["Still,", "Then again,", "That said,", "But", "Even so,", "However,"]}
MOODS = ("positive", "negative", "neutral")


def _words(mood: str) -> list[str]:
    return {"positive": _POSITIVE, "negative": _NEGATIVE, "neutral": _NEUTRAL}[mood]


def _verb(rng: random.Random, subject: str) -> str:
    verb = rng.choice(_VERBS)
    return "were" if verb == "was" and subject in _PLURAL_SUBJECTS else verb


def _adjectives(rng: random.Random, mood: str) -> str:
    """What follows a verb: an adjective in `mood`, maybe intensified, maybe joined by a second one."""
    words = _words(mood)
    phrase = rng.choice(words)
    if rng.random() < 0.45:
        phrase = f"{rng.choice(_ADVERBS)} {phrase}"
    if rng.random() < 0.35:
        phrase = f"{phrase} and {rng.choice(words)}"
    return phrase


def _clause(rng: random.Random, subject: str, mood: str) -> str:
    return f"{subject} {_verb(rng, subject)} {_adjectives(rng, mood)}"


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def review_continuation(rng: random.Random, mood: str, mixed: bool = False) -> str:
    """What follows an opening such as 'Honestly, the plot was': adjectives in `mood`, one or two more sentences
    in `mood` (with `mixed`, each may take another mood 40 % of the time), and half the time a verdict in `mood`."""
    parts = [f"{_adjectives(rng, mood)}."]
    for _ in range(1 if rng.random() < 0.85 else 2):
        sentence_mood = rng.choice(MOODS) if mixed and rng.random() < 0.4 else mood
        sentence = review_sentence(rng, sentence_mood)
        if rng.random() < 0.3:
            sentence = f"{rng.choice(_CONNECTIVES['same' if sentence_mood == mood else 'other'])} {sentence}"
        parts.append(_capitalised(sentence) + ".")
    if rng.random() < 0.5:
        parts.append(_capitalised(rng.choice(_TAILS[mood])) + ".")
    return " ".join(parts)


def synthetic_review(rng: random.Random) -> str:
    """One short review; moods are balanced so a sentiment reward starts near zero."""
    return synthetic_review_with_mood(rng, rng.choice(MOODS))


def synthetic_review_with_mood(rng: random.Random, mood: str) -> str:
    """One short review: an opening (`synthetic_prompt`) whose adjectives, and usually the rest, have `mood`:
    positive, negative or neutral."""
    return f"{synthetic_prompt(rng)} {review_continuation(rng, mood, mixed=True)}"


def synthetic_prompt(rng: random.Random) -> str:
    """A review opening that the policy continues: 'opener subject verb' ('Honestly, the plot was')."""
    subject = rng.choice(_SUBJECTS)
    return f"{rng.choice(_OPENERS)} {subject} {_verb(rng, subject)}"


def review_sentence(rng: random.Random, mood: str) -> str:
    """One clause in `mood` ('positive', 'negative' or 'neutral') in one of the reviews' sentence patterns,
    lower-case and without a full stop: 'the plot was really clever', 'it had a dull ending', ..."""
    subject, pattern = rng.choice(_SUBJECTS), rng.random()
    if pattern < 0.45:
        return _clause(rng, subject, mood)
    if pattern < 0.6:
        return f"I found {subject} {_adjectives(rng, mood)}"
    if pattern < 0.75:
        other = rng.choice([s for s in _SUBJECTS if s != subject])
        return f"{subject} and {other} were {_adjectives(rng, mood)}"
    if pattern < 0.9:
        adjective = rng.choice(_words(mood))
        return f"it had {'an' if adjective[0] in 'aeiou' else 'a'} {adjective} {rng.choice(_NOUNS)}"
    return f"{_clause(rng, subject, mood)}, and {_clause(rng, rng.choice(_SUBJECTS), mood)}"


def review_vocabulary() -> dict:
    """Copies of the word lists the reviews are built from, by role, for other built-in data sets
    ('categories': what each subject is about)."""
    return {
        "openers": list(_OPENERS), "subjects": list(_SUBJECTS), "verbs": list(_VERBS), "adverbs": list(_ADVERBS),
        "nouns": list(_NOUNS), "positive": list(_POSITIVE), "negative": list(_NEGATIVE), "neutral": list(_NEUTRAL),
        "positive_tails": list(_TAILS["positive"]), "negative_tails": list(_TAILS["negative"]),
        "neutral_tails": list(_TAILS["neutral"]),
        "categories": {category: list(subjects) for category, subjects in _SUBJECTS_BY_CATEGORY.items()},
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
