import math
import sys
import types

import numpy as np
import pytest
from pydantic import ValidationError

from raylign.actors.heuristic_reward import (
    COMPONENTS,
    HeuristicReward,
    HeuristicRewardConfig,
    HeuristicRewardWeights,
    engagement,
    generic_phrase_count,
    length_score,
    lexical_diversity,
    lexical_relevance,
    punctuation_balance,
    punctuation_ratio,
    sentiment_alignment,
)

PROMPT = "The new electric car battery lasts longer in cold weather, which is amazing news!"
REPLIES = [
    "Great post! Thanks for sharing.",
    "How does the battery hold up below freezing compared to last year's model?",
    "!!!!!!!???",
    "My grandmother bakes the best apple pie every Sunday.",
    "",
]


def _engagement(reply: str) -> float:
    cfg = HeuristicRewardConfig()
    return engagement(
        reply,
        cfg.generic_phrases,
        cfg.generic_phrase_penalty,
        cfg.question_bonus,
        cfg.specific_question_min_words,
    )


def test_generic_reply_scores_lower_engagement_than_specific_question():
    # Two generic phrases cost 2 * 0.25 from the 0.5 baseline; a specific question
    # earns the full 0.5 bonus.
    assert _engagement("Great post! Thanks for sharing.") == pytest.approx(0.0)
    specific = "How does the battery hold up below freezing compared to last year's model?"
    assert _engagement(specific) == pytest.approx(1.0)


def test_engagement_baseline_bare_question_and_single_generic_phrase():
    assert _engagement("The battery lasted all winter in Oslo.") == pytest.approx(0.5)
    assert _engagement("Really?") == pytest.approx(0.75)
    assert _engagement("So true, the battery lasted all winter.") == pytest.approx(0.25)


def test_generic_phrases_match_whole_words_case_insensitively_across_whitespace():
    assert generic_phrase_count("Nicely done, NICE work", ["nice"]) == 1
    assert generic_phrase_count("thanks  for\nsharing", ["thanks for sharing"]) == 1
    assert generic_phrase_count("nice nice", ["nice"]) == 2


def test_length_inside_band_scores_one_and_far_outside_lower():
    assert length_score("x" * 100, 50, 150) == 1.0
    assert length_score("x" * 50, 50, 150) == 1.0
    assert length_score("x" * 150, 50, 150) == 1.0
    assert length_score("  " + "x" * 50 + "\n", 50, 150) == 1.0
    # Scale is half the crossed bound: 25 short of 50, or 75 over 150, gives exp(-1).
    assert length_score("x" * 25, 50, 150) == pytest.approx(math.exp(-1))
    assert length_score("x" * 225, 50, 150) == pytest.approx(math.exp(-1))
    assert length_score("", 50, 150) == pytest.approx(math.exp(-4))
    assert length_score("x" * 300, 50, 150) == pytest.approx(math.exp(-4))
    assert length_score("x" * 40, 50, 150) > length_score("x" * 25, 50, 150)


def test_repeated_word_has_lower_diversity_than_varied_reply():
    assert lexical_diversity("spam spam spam spam") == pytest.approx(0.25)
    assert lexical_diversity("the cat sat on a warm mat") == pytest.approx(1.0)
    assert lexical_diversity("Spam SPAM eggs") == pytest.approx(2 / 3)


def test_diversity_of_text_without_words_is_zero():
    assert lexical_diversity("") == 0.0
    assert lexical_diversity("!!! ???") == 0.0


def test_punctuation_spam_scores_lower_than_normal_sentence():
    sentence = "I think the new policy will help small businesses."
    assert punctuation_ratio(sentence) == pytest.approx(1 / 42)
    assert punctuation_balance(sentence, 0.01, 0.10) == 1.0
    assert punctuation_ratio("!!!!!!!???") == 1.0
    assert punctuation_balance("!!!!!!!???", 0.01, 0.10) == pytest.approx(math.exp(-81))


def test_no_punctuation_is_penalised_and_word_marks_are_not_punctuation():
    assert punctuation_balance("I think so too", 0.01, 0.10) == pytest.approx(math.exp(-1))
    assert punctuation_ratio("don't #AI @bob") == 0.0


def test_sentiment_alignment_is_one_minus_half_the_compound_gap():
    assert sentiment_alignment(0.8, 0.8) == pytest.approx(1.0)
    assert sentiment_alignment(0.8, -0.8) == pytest.approx(0.2)
    assert sentiment_alignment(1.0, -1.0) == pytest.approx(0.0)
    assert sentiment_alignment(0.0, 0.5) == pytest.approx(0.75)


def test_sentiment_alignment_higher_for_reply_matching_positive_prompt():
    reward = HeuristicReward(HeuristicRewardConfig())
    prompt = "I love this new park, it is wonderful!"
    matching, opposite = reward.components(
        [prompt, prompt],
        ["What a lovely idea, I am so happy about it.", "This is terrible and I hate it."],
    )
    assert matching["sentiment"] > 0.95
    assert opposite["sentiment"] < 0.25


def test_lexical_relevance_is_cosine_of_content_word_counts():
    # {red, apples, taste, sweet} vs {sweet, red, apples}: 3 / (2 * sqrt(3)).
    assert lexical_relevance("red apples taste sweet", "sweet red apples") == pytest.approx(
        math.sqrt(3) / 2
    )
    assert lexical_relevance("apple apple pie", "apple") == pytest.approx(2 / math.sqrt(5))
    assert lexical_relevance("the and of", "the and of") == 0.0
    assert lexical_relevance("", "") == 0.0


def test_relevance_higher_for_on_topic_reply_with_lexical_fallback():
    reward = HeuristicReward(HeuristicRewardConfig())
    assert reward.relevance_method == "lexical"
    on_topic, off_topic = reward.components([PROMPT, PROMPT], [REPLIES[1], REPLIES[3]])
    assert on_topic["relevance"] > 0.1
    assert off_topic["relevance"] == 0.0


def test_missing_sentence_transformers_falls_back_to_lexical_with_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.warns(UserWarning, match="sentence-transformers is not installed"):
        reward = HeuristicReward(HeuristicRewardConfig(embedding_model="all-MiniLM-L6-v2"))
    assert reward.relevance_method == "lexical"


def test_embedding_relevance_encodes_one_batch_and_clips_negative_cosine(monkeypatch):
    vectors = {"p": [1.0, 0.0], "same": [1.0, 0.0], "diagonal": [0.6, 0.8], "opposite": [-1.0, 0.0]}
    calls = []

    class FakeSentenceTransformer:
        def __init__(self, name):
            self.name = name

        def encode(self, texts, convert_to_numpy, normalize_embeddings):
            calls.append(list(texts))
            return np.array([vectors[t] for t in texts])

    module = types.ModuleType("sentence_transformers")
    module.SentenceTransformer = FakeSentenceTransformer
    monkeypatch.setitem(sys.modules, "sentence_transformers", module)

    reward = HeuristicReward(HeuristicRewardConfig(embedding_model="fake"))
    assert reward.relevance_method == "embedding"
    parts = reward.components(["p", "p", "p"], ["same", "diagonal", "opposite"])
    assert [c["relevance"] for c in parts] == pytest.approx([1.0, 0.6, 0.0])
    assert calls == [["p", "p", "p", "same", "diagonal", "opposite"]]


def test_total_is_in_unit_interval_and_equals_weighted_mean_of_components():
    weights = HeuristicRewardWeights(
        relevance=0.5, length=0.1, sentiment=0.2, diversity=0.3, punctuation=0.0, engagement=0.4
    )
    reward = HeuristicReward(HeuristicRewardConfig(weights=weights))
    prompts = [PROMPT] * len(REPLIES)
    totals = reward.score(prompts, REPLIES)
    parts = reward.components(prompts, REPLIES)
    w = weights.as_dict()
    for total, part in zip(totals, parts):
        assert set(part) == set(COMPONENTS)
        assert all(0.0 <= value <= 1.0 for value in part.values())
        assert 0.0 <= total <= 1.0
        assert total == pytest.approx(sum(w[k] * part[k] for k in COMPONENTS) / 1.5)


def test_default_weights_rank_specific_question_above_generic_and_spam():
    reward = HeuristicReward(HeuristicRewardConfig())
    generic, specific, spam, _, empty = reward.score([PROMPT] * len(REPLIES), REPLIES)
    assert specific > generic > spam
    assert specific > empty


def test_weights_select_and_mix_components():
    prompts, replies = [PROMPT] * len(REPLIES), REPLIES
    parts = HeuristicReward(HeuristicRewardConfig()).components(prompts, replies)

    only_engagement = HeuristicRewardWeights(
        relevance=0, length=0, sentiment=0, diversity=0, punctuation=0, engagement=1
    )
    totals = HeuristicReward(HeuristicRewardConfig(weights=only_engagement)).score(prompts, replies)
    assert totals == pytest.approx([p["engagement"] for p in parts])

    two_to_one = HeuristicRewardWeights(
        relevance=2, length=1, sentiment=0, diversity=0, punctuation=0, engagement=0
    )
    totals = HeuristicReward(HeuristicRewardConfig(weights=two_to_one)).score(prompts, replies)
    assert totals == pytest.approx([(2 * p["relevance"] + p["length"]) / 3 for p in parts])


def test_scaling_all_weights_leaves_total_unchanged():
    doubled = HeuristicRewardWeights(
        **{k: 2 * v for k, v in HeuristicRewardWeights().as_dict().items()}
    )
    prompts = [PROMPT] * len(REPLIES)
    base = HeuristicReward(HeuristicRewardConfig()).score(prompts, REPLIES)
    scaled = HeuristicReward(HeuristicRewardConfig(weights=doubled)).score(prompts, REPLIES)
    assert scaled == pytest.approx(base)


def test_negative_weight_is_rejected_naming_the_field():
    with pytest.raises(ValidationError, match=r"weights\.relevance = -0\.1.*>= 0"):
        HeuristicRewardConfig(weights={"relevance": -0.1})


def test_non_finite_weight_is_rejected_naming_the_field():
    with pytest.raises(ValidationError, match=r"weights\.engagement = nan"):
        HeuristicRewardConfig(weights={"engagement": float("nan")})


def test_all_zero_weights_are_rejected_with_the_fix():
    zeros = {k: 0.0 for k in COMPONENTS}
    with pytest.raises(ValidationError, match="weights are all 0: set at least one"):
        HeuristicRewardConfig(weights=zeros)


def test_unknown_weight_key_is_rejected():
    with pytest.raises(ValidationError, match="relevence"):
        HeuristicRewardConfig(weights={"relevence": 0.3})


def test_inverted_length_band_is_rejected_naming_both_fields():
    with pytest.raises(ValidationError, match="max_chars = 40 is below min_chars = 50"):
        HeuristicRewardConfig(min_chars=50, max_chars=40)


def test_blank_generic_phrase_is_rejected():
    with pytest.raises(ValidationError, match=r"generic_phrases\[1\]"):
        HeuristicRewardConfig(generic_phrases=["so true", "  "])


def test_every_config_field_has_a_description():
    for model in (HeuristicRewardConfig, HeuristicRewardWeights):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_mismatched_batch_lengths_raise():
    reward = HeuristicReward(HeuristicRewardConfig())
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        reward.score(["a", "b"], ["c"])
    assert reward.score([], []) == []
