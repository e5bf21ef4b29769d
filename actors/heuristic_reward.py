"""Weighted heuristic reward for short social-media replies (no learned model).

Six components, each a float in [0, 1], are combined as a weighted mean, so
the total also lies in [0, 1]:

- relevance:   how much the reply is about the prompt. Cosine similarity of
               sentence embeddings when ``embedding_model`` is set and
               sentence-transformers is installed, else cosine similarity of
               content-word counts. ``HeuristicReward.relevance_method`` says
               which one is in use.
- length:      1.0 inside [min_chars, max_chars], Gaussian decay outside.
- sentiment:   closeness of the VADER compound scores of prompt and reply.
- diversity:   unique-word ratio of the reply.
- punctuation: 1.0 when the share of punctuation characters is inside a band,
               Gaussian decay outside (both "no punctuation" and "!!!???").
- engagement:  penalty per generic phrase ("great post", "so true"), bonus for
               a question, a larger one for a specific question.

The pure functions below compute one component each; ``HeuristicReward`` wires
them to a config and batches the embedding computation.
"""

from __future__ import annotations

import math
import re
import unicodedata
import warnings
from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

COMPONENTS = ("relevance", "length", "sentiment", "diversity", "punctuation", "engagement")

DEFAULT_GENERIC_PHRASES = (
    "great post",
    "thanks for sharing",
    "so true",
    "nice",
    "love this",
    "well said",
    "totally agree",
    "couldn't agree more",
    "great point",
    "this is great",
    "awesome",
)

# Small closed list so relevance and question specificity run offline with no
# corpus download; it only has to drop the words that carry no topic.
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't could couldn't did didn't do does
    doesn't doing don't down during each few for from further had hadn't has hasn't have
    haven't having he he'd he'll he's her here here's hers herself him himself his how
    how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's me more
    most mustn't my myself no nor not now of off on once only or other ought our ours
    ourselves out over own same shan't she she'd she'll she's should shouldn't so some
    such than that that's the their theirs them themselves then there there's these they
    they'd they'll they're they've this those through to too under until up very was
    wasn't we we'd we'll we're we've were weren't what what's when when's where where's
    which while who who's whom why why's will with won't would wouldn't you you'd you'll
    you're you've your yours yourself yourselves
    """.split()
)

_URL = re.compile(r"https?://\S+|www\.\S+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_QUESTION = re.compile(r"[^.!?]*\?")
# Apostrophes live inside words ("don't"); '#' and '@' mark hashtags and
# mentions, which are words on social media, not punctuation.
_NOT_PUNCTUATION = frozenset("'\u2019#@")


class HeuristicRewardWeights(BaseModel):
    """Weight of each component in the weighted mean; only their ratios matter."""

    model_config = ConfigDict(extra="forbid")

    relevance: float = Field(0.30, description="Weight of prompt/reply relevance.")
    length: float = Field(0.15, description="Weight of the length-in-band score.")
    sentiment: float = Field(0.15, description="Weight of prompt/reply sentiment alignment.")
    diversity: float = Field(0.10, description="Weight of the reply's unique-word ratio.")
    punctuation: float = Field(0.10, description="Weight of the punctuation-balance score.")
    engagement: float = Field(
        0.20, description="Weight of the engagement score (generic phrases, questions)."
    )

    @field_validator(*COMPONENTS)
    @classmethod
    def _non_negative_finite(cls, value: float, info) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"weights.{info.field_name} = {value}: each weight must be a finite number "
                f">= 0; set it to 0 to switch the {info.field_name} component off"
            )
        return value

    @model_validator(mode="after")
    def _not_all_zero(self) -> HeuristicRewardWeights:
        if sum(self.as_dict().values()) == 0:
            raise ValueError(
                "weights are all 0: set at least one of weights."
                + ", weights.".join(COMPONENTS)
                + " to a positive number"
            )
        return self

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in COMPONENTS}


class HeuristicRewardConfig(BaseModel):
    """Configuration of the heuristic reply reward."""

    model_config = ConfigDict(extra="forbid")

    weights: HeuristicRewardWeights = Field(
        default_factory=HeuristicRewardWeights,
        description="Per-component weights; the total is the weighted sum divided by "
        "the sum of the weights, so it stays in [0, 1].",
    )
    min_chars: int = Field(
        50,
        ge=0,
        description="Lower end of the target reply length in characters (after stripping). "
        "Below it the length score decays as exp(-(2 * shortfall / min_chars)^2).",
    )
    max_chars: int = Field(
        150,
        gt=0,
        description="Upper end of the target reply length in characters (after stripping). "
        "Above it the length score decays as exp(-(2 * excess / max_chars)^2).",
    )
    embedding_model: str | None = Field(
        None,
        description="sentence-transformers model name or path for embedding relevance. "
        "None uses lexical overlap. If set but sentence-transformers is not installed, "
        "relevance falls back to lexical overlap with a warning.",
    )
    generic_phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_GENERIC_PHRASES),
        description="Phrases that mark a generic reply; matched case-insensitively as "
        "whole words. Each occurrence costs generic_phrase_penalty of engagement.",
    )
    generic_phrase_penalty: float = Field(
        0.25, ge=0, le=1, description="Engagement lost per generic-phrase occurrence."
    )
    question_bonus: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Engagement gained by a specific question; any other question gains "
        "half. A reply with no question and no generic phrase scores 1 - question_bonus.",
    )
    specific_question_min_words: int = Field(
        3,
        ge=1,
        description="Content words (non-stopwords) a question sentence needs to count as "
        "specific.",
    )
    punctuation_min_ratio: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Lower end of the target share of punctuation among non-space "
        "characters. Below it the score decays as exp(-(shortfall / punctuation_min_ratio)^2), "
        "so a reply with no punctuation scores exp(-1).",
    )
    punctuation_max_ratio: float = Field(
        0.10,
        gt=0,
        le=1,
        description="Upper end of the target share of punctuation among non-space "
        "characters. Above it the score decays as exp(-(excess / punctuation_max_ratio)^2).",
    )

    @field_validator("generic_phrases")
    @classmethod
    def _no_blank_phrase(cls, phrases: list[str]) -> list[str]:
        for index, phrase in enumerate(phrases):
            if not phrase.strip():
                raise ValueError(
                    f"generic_phrases[{index}] = {phrase!r} is blank and would match every "
                    "reply; remove it or give it words"
                )
        return phrases

    @model_validator(mode="after")
    def _bands_ordered(self) -> HeuristicRewardConfig:
        if self.max_chars < self.min_chars:
            raise ValueError(
                f"max_chars = {self.max_chars} is below min_chars = {self.min_chars}: "
                "set max_chars >= min_chars"
            )
        if self.punctuation_max_ratio < self.punctuation_min_ratio:
            raise ValueError(
                f"punctuation_max_ratio = {self.punctuation_max_ratio} is below "
                f"punctuation_min_ratio = {self.punctuation_min_ratio}: "
                "set punctuation_max_ratio >= punctuation_min_ratio"
            )
        return self


def words(text: str) -> list[str]:
    """Lower-cased word tokens, contractions kept whole, URLs dropped."""
    return _WORD.findall(_URL.sub(" ", text.lower()))


def content_words(text: str) -> list[str]:
    return [word for word in words(text) if word not in STOPWORDS]


def band_score(
    value: float, low: float, high: float, scale_below: float, scale_above: float
) -> float:
    """1.0 inside [low, high]; exp(-(distance / scale)^2) outside, smooth at the edges."""
    if value < low:
        return math.exp(-(((low - value) / scale_below) ** 2))
    if value > high:
        return math.exp(-(((value - high) / scale_above) ** 2))
    return 1.0


def lexical_relevance(prompt: str, reply: str) -> float:
    """Cosine similarity of content-word counts; 0.0 when no content word is shared."""
    prompt_counts = Counter(content_words(prompt))
    reply_counts = Counter(content_words(reply))
    dot = sum(count * reply_counts[word] for word, count in prompt_counts.items())
    if dot == 0:
        return 0.0
    norm = math.sqrt(sum(c * c for c in prompt_counts.values())) * math.sqrt(
        sum(c * c for c in reply_counts.values())
    )
    return dot / norm


def length_score(reply: str, min_chars: int, max_chars: int) -> float:
    """Band score of the stripped length; min_chars / 2 or 1.5 * max_chars gives exp(-1)."""
    return band_score(len(reply.strip()), min_chars, max_chars, min_chars / 2, max_chars / 2)


def sentiment_alignment(prompt_compound: float, reply_compound: float) -> float:
    """1 - |difference| / 2 of two VADER compound scores in [-1, 1]."""
    return 1.0 - abs(prompt_compound - reply_compound) / 2.0


def lexical_diversity(reply: str) -> float:
    """Unique words / words; 0.0 for a reply with no words."""
    tokens = words(reply)
    if not tokens:
        return 0.0
    return len(set(tokens)) / len(tokens)


def punctuation_ratio(reply: str) -> float:
    """Share of Unicode punctuation among non-space characters (0.0 for empty text)."""
    chars = [ch for ch in reply if not ch.isspace()]
    punctuation = sum(
        1 for ch in chars if unicodedata.category(ch).startswith("P") and ch not in _NOT_PUNCTUATION
    )
    return punctuation / max(1, len(chars))


def punctuation_balance(reply: str, min_ratio: float, max_ratio: float) -> float:
    return band_score(punctuation_ratio(reply), min_ratio, max_ratio, min_ratio, max_ratio)


def generic_phrase_count(reply: str, phrases: list[str]) -> int:
    """Whole-word, case-insensitive phrase occurrences; any whitespace between words."""
    count = 0
    for phrase in phrases:
        body = r"\s+".join(re.escape(part) for part in phrase.split())
        count += len(re.findall(rf"(?<!\w){body}(?!\w)", reply, flags=re.IGNORECASE))
    return count


def engagement(
    reply: str,
    generic_phrases: list[str],
    generic_phrase_penalty: float,
    question_bonus: float,
    specific_question_min_words: int,
) -> float:
    """1 - question_bonus - generic-phrase penalties + question bonus, clipped to [0, 1]."""
    questions = _QUESTION.findall(reply)
    if any(len(content_words(q)) >= specific_question_min_words for q in questions):
        bonus = question_bonus
    elif questions:
        bonus = question_bonus / 2
    else:
        bonus = 0.0
    penalty = generic_phrase_penalty * generic_phrase_count(reply, generic_phrases)
    return min(1.0, max(0.0, 1.0 - question_bonus - penalty + bonus))


class HeuristicReward:
    """Batched heuristic reward: ``score`` for totals, ``components`` for the breakdown."""

    relevance_method: Literal["embedding", "lexical"]

    def __init__(self, config: HeuristicRewardConfig) -> None:
        self.config = config
        self._weights = config.weights.as_dict()
        self._sentiment = SentimentIntensityAnalyzer()
        self._encoder = None
        self.relevance_method = "lexical"
        if config.embedding_model is not None:
            try:
                from sentence_transformers import SentenceTransformer
            except ModuleNotFoundError as err:
                # Only the package itself being absent is a documented fallback;
                # a broken dependency inside it is a real error and propagates.
                if err.name != "sentence_transformers":
                    raise
                warnings.warn(
                    f"embedding_model = {config.embedding_model!r} but sentence-transformers "
                    "is not installed: relevance uses lexical overlap "
                    "(relevance_method = 'lexical'). Install sentence-transformers, or set "
                    "embedding_model to null to choose lexical relevance explicitly.",
                    stacklevel=2,
                )
            else:
                self._encoder = SentenceTransformer(config.embedding_model)
                self.relevance_method = "embedding"

    def components(self, prompts: list[str], completions: list[str]) -> list[dict[str, float]]:
        """Per-sample component scores, keyed like the weights, each in [0, 1]."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"got {len(prompts)} prompts and {len(completions)} completions: "
                "pass one prompt per completion (repeat a prompt for each of its samples)"
            )
        relevance = self._relevance(prompts, completions)
        cfg = self.config
        breakdown = []
        for prompt, reply, rel in zip(prompts, completions, relevance):
            breakdown.append(
                {
                    "relevance": rel,
                    "length": length_score(reply, cfg.min_chars, cfg.max_chars),
                    "sentiment": sentiment_alignment(
                        self._sentiment.polarity_scores(prompt)["compound"],
                        self._sentiment.polarity_scores(reply)["compound"],
                    ),
                    "diversity": lexical_diversity(reply),
                    "punctuation": punctuation_balance(
                        reply, cfg.punctuation_min_ratio, cfg.punctuation_max_ratio
                    ),
                    "engagement": engagement(
                        reply,
                        cfg.generic_phrases,
                        cfg.generic_phrase_penalty,
                        cfg.question_bonus,
                        cfg.specific_question_min_words,
                    ),
                }
            )
        return breakdown

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """Weighted mean of the components per sample, in [0, 1]."""
        total_weight = sum(self._weights.values())
        return [
            sum(self._weights[name] * parts[name] for name in COMPONENTS) / total_weight
            for parts in self.components(prompts, completions)
        ]

    def _relevance(self, prompts: list[str], completions: list[str]) -> list[float]:
        if self._encoder is None:
            return [lexical_relevance(p, c) for p, c in zip(prompts, completions)]
        if not prompts:
            return []
        embeddings = self._encoder.encode(
            list(prompts) + list(completions), convert_to_numpy=True, normalize_embeddings=True
        )
        n = len(prompts)
        cosines = (embeddings[:n] * embeddings[n:]).sum(axis=1)
        # Negative cosine means unrelated as far as a reward is concerned.
        return [min(1.0, max(0.0, float(c))) for c in cosines]
