"""Evaluation metrics against hand-computed values: diversity, pass@k, KL to the reference, summaries."""

import math

import pytest
import torch

from raylign.common.eval_metrics import (
    distinct_n,
    kl_estimate,
    kl_exact_from_logits,
    kl_k3_sequence,
    pass_at_k,
    perplexity,
    response_length_stats,
    self_bleu,
    summarise_rewards,
)


def test_distinct_n_counts_unique_ngrams_over_the_whole_set():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 unique of 6; bigrams: (the cat) x2, (cat sat), (cat ran) -> 3 of 4.
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["a b", "c d"], 1) == 1.0
    assert distinct_n(["one", "two"], 2) == 0.0  # no bigram anywhere


def test_self_bleu_is_one_for_identical_texts_and_zero_for_disjoint_ones():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)
    assert self_bleu(["ok then", "ok then"]) == pytest.approx(1.0)  # shorter than 4 words: effective order 2
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0


def test_self_bleu_matches_a_hand_computed_bleu_2():
    # "a b c" vs reference "a b d" (and back): p1 = 2/3, p2 = 1/2 ("a b" matches), equal lengths so no brevity penalty.
    expected = math.sqrt(2 / 3 * 1 / 2)
    assert self_bleu(["a b c", "a b d"], max_n=2) == pytest.approx(expected)
    # Method-1 smoothing: "a c" vs "a b" has p1 = 1/2 and no bigram match, p2 = 0.1 / 1.
    assert self_bleu(["a c", "a b"], max_n=2) == pytest.approx(math.sqrt(1 / 2 * 0.1))


def test_self_bleu_clips_at_the_best_single_reference_and_applies_the_brevity_penalty():
    # Hypothesis "x x" against references "x y" and "z": clipped unigram matches 1 of 2 (max count of x in one
    # reference is 1). Closest reference length is 2, hypothesis 2, no penalty; BLEU-1 = 1/2.
    texts = ["x x", "x y", "z"]
    # "x y" vs {"x x", "z"}: p1 = 1/2, closest length 2, BLEU-1 = 1/2. "z" vs {"x x", "x y"}: no match -> 0.
    assert self_bleu(texts, max_n=1) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    # Hypothesis "a" against "a b c": p1 = 1, brevity exp(1 - 3/1).
    assert self_bleu(["a", "a b c"], max_n=1) == pytest.approx((math.exp(1 - 3) + 1 / 3) / 2)


def test_self_bleu_needs_two_texts():
    with pytest.raises(ValueError, match="at least 2 texts"):
        self_bleu(["alone"])


def test_pass_at_k_uses_the_unbiased_estimator_when_there_are_more_samples_than_k():
    # n = 4, c = 1, k = 2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.  n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert pass_at_k([[0.9, 0.1, 0.2, 0.3]], k=2, threshold=0.5) == pytest.approx(0.5)
    assert pass_at_k([[1, 1, 0, 0, 0]], k=2, threshold=1.0) == pytest.approx(0.7)
    assert pass_at_k([[0.9, 0.1, 0.2, 0.3], [1, 1, 0, 0, 0]], k=2, threshold=0.5) == pytest.approx((0.5 + 0.7) / 2)
    # n = k: the plain indicator. Threshold is inclusive.
    assert pass_at_k([[0.5, 0.0], [0.0, 0.0], [0.1, 0.7]], k=2, threshold=0.5) == pytest.approx(2 / 3)
    # Fewer than k failures: every k-subset contains a pass.
    assert pass_at_k([[1, 1, 1, 0]], k=2, threshold=1.0) == 1.0
    assert pass_at_k([[0, 0, 0]], k=1, threshold=0.5) == 0.0


def test_pass_at_k_refuses_prompts_with_fewer_than_k_samples():
    with pytest.raises(ValueError, match="prompt 1 has 1 samples"):
        pass_at_k([[1, 0], [1]], k=2, threshold=0.5)


def _sampled_logprobs(policy_logits, reference_logits, seed=0):
    """Tokens sampled from the policy at temperature 1 and both models' logprobs of them."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(policy_logits, dim=-1)
    tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])
    policy = torch.log_softmax(policy_logits, -1).gather(-1, tokens[..., None])[..., 0]
    reference = torch.log_softmax(reference_logits, -1).gather(-1, tokens[..., None])[..., 0]
    return policy, reference


def test_kl_of_the_reference_against_itself_is_zero():
    logits = torch.randn(16, 6, 20, generator=torch.Generator().manual_seed(0))
    masks = torch.ones(16, 6)
    logp, ref = _sampled_logprobs(logits, logits)
    assert kl_estimate(logp, ref, masks) == 0.0
    assert torch.equal(kl_exact_from_logits(logits, logits, masks), torch.zeros(16, dtype=torch.float64))


def test_kl_of_a_different_policy_is_positive_and_the_sample_estimate_tracks_the_exact_one():
    generator = torch.Generator().manual_seed(1)
    reference_logits = torch.randn(4000, 3, 8, generator=generator)
    policy_logits = reference_logits + 0.5 * torch.randn(4000, 3, 8, generator=generator)
    masks = torch.ones(4000, 3)
    masks[:, 2] = 0  # the last position is padding
    logp, ref = _sampled_logprobs(policy_logits, reference_logits)
    exact = kl_exact_from_logits(policy_logits, reference_logits, masks).mean().item()
    estimate = kl_estimate(logp, ref, masks)
    assert exact > 0.05
    assert estimate == pytest.approx(exact, rel=0.1)


def test_k3_kl_is_never_negative_even_where_k1_is():
    # Sampled tokens the reference likes more than the policy: the k1 sum is -0.5, k3 stays positive.
    logp = torch.tensor([[-2.0, -1.5]])
    ref = torch.tensor([[-1.5, -1.5]])
    assert (logp - ref).sum().item() < 0
    per_sequence = kl_k3_sequence(logp, ref, torch.ones(1, 2))
    assert per_sequence.item() == pytest.approx(math.exp(0.5) - 1 - 0.5)
    generator = torch.Generator().manual_seed(2)
    many = kl_k3_sequence(torch.randn(64, 10, generator=generator), torch.randn(64, 10, generator=generator), torch.ones(64, 10))
    assert (many >= 0).all()


def test_kl_ignores_masked_positions_even_when_they_hold_minus_infinity():
    logp = torch.tensor([[-1.0, float("-inf")]])
    ref = torch.tensor([[-1.0, -3.0]])
    assert kl_k3_sequence(logp, ref, torch.tensor([[1, 0]])).item() == 0.0


def test_exact_kl_matches_the_hand_computed_value_for_two_tokens():
    # pi = (0.5, 0.5), ref = (0.25, 0.75): KL = 0.5 ln 2 + 0.5 ln(2/3).
    policy = torch.log(torch.tensor([[[0.5, 0.5]]]))
    reference = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert kl_exact_from_logits(policy, reference, torch.ones(1, 1)).item() == pytest.approx(expected)


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="token_count = 0"):
        perplexity(1.0, 0)


def test_reward_and_length_summaries():
    assert summarise_rewards([1.0, 2.0, 3.0, 6.0]) == pytest.approx({"mean": 3.0, "std": math.sqrt(3.5), "min": 1.0, "max": 6.0})
    stats = response_length_stats([4, 8, 8, 12], max_new_tokens=8)
    assert stats == pytest.approx({"mean": 8.0, "std": math.sqrt(8.0), "min": 4, "max": 12, "truncated_fraction": 0.75})
    with pytest.raises(ValueError, match="non-finite"):
        summarise_rewards([1.0, float("nan")])
