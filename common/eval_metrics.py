"""Evaluation metrics for a model's samples: diversity, pass@k, KL to the reference, perplexity, summaries.

Pure functions on plain lists and tensors: no models, no files, no Ray. The
driver collects samples, rewards and logprobs at evaluation time and calls
these.

Text metrics (distinct-n, Self-BLEU) split on whitespace: they compare
samples of one run with each other and with other runs scored the same way,
so a simple, tokenizer-free split keeps them comparable across models with
different vocabularies.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Sequence

import torch
from torch import Tensor

# Method-1 smoothing (Chen & Cherry 2014, nltk's `method1`): an n-gram order with no match counts epsilon matches.
BLEU_SMOOTHING_EPSILON = 0.1


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over every text (Li et al. 2016).

    1.0 when no n-gram repeats anywhere in the set; a set of texts with no
    n-gram at all (all shorter than n words) scores 0.0.
    """
    if n < 1:
        raise ValueError(f"n = {n} must be at least 1")
    grams = [gram for text in texts for gram in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _bleu_against(
    hypothesis: Sequence[str],
    hypothesis_counts: list[Counter],
    reference_max_counts: list[dict[tuple[str, ...], int]],
    closest_reference_length: int,
    max_n: int,
) -> float:
    """Multi-reference sentence BLEU with method-1 smoothing.

    Modified precision p_n clips each hypothesis n-gram count at its largest
    count in any one reference. Orders the hypothesis is too short to have
    (n > its length) are left out and the weights spread uniformly over the
    rest, so an identical short text still scores 1.0 (nltk's
    ``auto_reweigh``, sacreBLEU's effective order). No unigram match at all
    gives 0.0, as in nltk.
    """
    length = len(hypothesis)
    orders = range(1, min(max_n, length) + 1)
    log_precisions = []
    for n in orders:
        counts = hypothesis_counts[n - 1]
        matches = sum(min(count, reference_max_counts[n - 1].get(gram, 0)) for gram, count in counts.items())
        if n == 1 and matches == 0:
            return 0.0
        total = sum(counts.values())
        log_precisions.append(math.log((matches if matches else BLEU_SMOOTHING_EPSILON) / total))
    if not log_precisions:
        return 0.0
    brevity = 1.0 if length > closest_reference_length else math.exp(1.0 - closest_reference_length / length)
    return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Mean BLEU-``max_n`` of each text against all the other texts as references (Zhu et al. 2018, Texygen).

    Higher means less diverse: identical texts score 1.0, texts sharing no
    word score 0.0. Each sentence BLEU is :func:`_bleu_against` (uniform
    weights, method-1 smoothing, brevity penalty against the reference
    length closest to the hypothesis, the shorter one on a tie). Exact, not
    sampled: every text is scored against all others, in time linear in the
    total number of n-grams.
    """
    if max_n < 1:
        raise ValueError(f"max_n = {max_n} must be at least 1")
    if len(texts) < 2:
        raise ValueError(f"Self-BLEU needs at least 2 texts (each is scored against the others), got {len(texts)}")
    tokenised = [text.split() for text in texts]
    counts = [[Counter(_ngrams(tokens, n)) for n in range(1, max_n + 1)] for tokens in tokenised]
    # For each n-gram, the largest and second-largest count over all texts and how many texts hold the
    # largest, so "largest count in any text but i" is O(1) instead of a scan over every other text.
    tops: list[dict[tuple[str, ...], list[int]]] = [{} for _ in range(max_n)]
    for text_counts in counts:
        for order, counter in enumerate(text_counts):
            for gram, count in counter.items():
                top = tops[order].setdefault(gram, [0, 0, 0])  # [largest, holders of largest, second largest]
                if count > top[0]:
                    top[:] = [count, 1, top[0]]
                elif count == top[0]:
                    top[1] += 1
                elif count > top[2]:
                    top[2] = count
    lengths = sorted(len(tokens) for tokens in tokenised)
    scores = []
    for tokens, text_counts in zip(tokenised, counts):
        others_max = []
        for order, counter in enumerate(text_counts):
            excluded = {}
            for gram, count in counter.items():
                largest, holders, second = tops[order][gram]
                excluded[gram] = second if count == largest and holders == 1 else largest
            others_max.append(excluded)
        other_lengths = list(lengths)
        other_lengths.remove(len(tokens))
        closest = min(other_lengths, key=lambda r: (abs(r - len(tokens)), r))
        scores.append(_bleu_against(tokens, text_counts, others_max, closest, max_n))
    return sum(scores) / len(scores)


def pass_at_k(rewards_per_prompt: Sequence[Sequence[float]], k: int, threshold: float) -> float:
    """Share of prompts on which at least one of k samples scores ``>= threshold``.

    A prompt with n >= k samples of which c clear the threshold contributes
    the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021): the
    chance that k samples drawn without replacement from the n include a
    passing one. Drawing n > k and averaging over subsets this way has lower
    variance than taking the first k. With n == k it is the plain 0/1
    indicator. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms
    the large binomials.
    """
    if k < 1:
        raise ValueError(f"k = {k} must be at least 1")
    if not rewards_per_prompt:
        raise ValueError("pass@k needs at least one prompt")
    estimates = []
    for index, rewards in enumerate(rewards_per_prompt):
        n = len(rewards)
        if n < k:
            raise ValueError(f"prompt {index} has {n} samples; pass@{k} needs at least k = {k} per prompt")
        c = sum(1 for reward in rewards if reward >= threshold)
        if n - c < k:
            estimates.append(1.0)
            continue
        estimates.append(1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1)))
    return sum(estimates) / len(estimates)


def _check_token_shapes(masks: Tensor, **tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != masks.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but masks has {tuple(masks.shape)}; both are [sequences, tokens]")


def kl_k3_sequence(policy_logprobs: Tensor, reference_logprobs: Tensor, masks: Tensor) -> Tensor:
    """Per-sequence KL(pi || ref) estimate, [B], from tokens sampled from pi: sum over tokens of k3.

    With r = ref_logp - logp per token, k3 = exp(r) - 1 - r (Schulman,
    "Approximating KL divergence"). k3 >= 0 for every r, so the estimate is
    never negative, and E_{x~pi}[k3] = KL(pi(.|prefix) || ref(.|prefix)), so
    by the chain rule the token sum is an unbiased estimate of the sequence
    KL. The plain k1 sum of (logp - ref_logp) is unbiased too but goes
    negative on a finite sample, which reads as nonsense in a report.

    Valid only when the tokens were sampled from pi itself at temperature 1
    with no top-p/top-k truncation, and ``policy_logprobs`` are pi's
    logprobs of those tokens. Inputs are [B, T]; ``masks`` is 1 on the
    completion tokens (EOS included) and 0 on prompt and padding.
    """
    policy_logprobs, reference_logprobs = torch.as_tensor(policy_logprobs), torch.as_tensor(reference_logprobs)
    masks = torch.as_tensor(masks)
    _check_token_shapes(masks, policy_logprobs=policy_logprobs, reference_logprobs=reference_logprobs)
    r = reference_logprobs.double() - policy_logprobs.double()
    per_token = torch.expm1(r) - r
    # where(), not a product: padding may hold -inf logprobs, and 0 * nan is nan.
    return torch.where(masks.bool(), per_token, 0.0).sum(dim=-1)


def kl_exact_from_logits(policy_logits: Tensor, reference_logits: Tensor, masks: Tensor) -> Tensor:
    """Per-sequence KL(pi || ref), [B], summing the exact per-position KL over the vocabulary.

    At each completion position sum_v pi(v) (log pi(v) - log ref(v)), from
    the full next-token distributions; summed over the sampled sequence this
    estimates the sequence KL with less variance than any sample-based
    estimator. Logits are [B, T, V] and already aligned so position t
    predicts token t (the same alignment as the logprobs); ``masks`` is
    [B, T]. Each position is clamped at 0, which only removes float rounding
    (the exact KL is never negative).
    """
    policy_logits, reference_logits, masks = map(torch.as_tensor, (policy_logits, reference_logits, masks))
    if policy_logits.shape != reference_logits.shape or policy_logits.shape[:-1] != masks.shape:
        raise ValueError(
            f"logits must be [B, T, V] with masks [B, T]; got policy {tuple(policy_logits.shape)}, "
            f"reference {tuple(reference_logits.shape)}, masks {tuple(masks.shape)}"
        )
    policy_log = torch.log_softmax(policy_logits.double(), dim=-1)
    reference_log = torch.log_softmax(reference_logits.double(), dim=-1)
    policy_probs = policy_log.exp()
    # A token pi gives no mass (a -inf logit) contributes 0, not 0 * (-inf - x) = nan.
    terms = torch.where(policy_probs > 0, policy_probs * (policy_log - reference_log), 0.0)
    per_token = terms.sum(dim=-1).clamp(min=0.0)
    return torch.where(masks.bool(), per_token, 0.0).sum(dim=-1)


def kl_estimate(policy_logprobs: Tensor, reference_logprobs: Tensor, masks: Tensor) -> float:
    """KL(pi || ref) of a model's samples: the mean over sequences of :func:`kl_k3_sequence`.

    Never negative. Use :func:`kl_exact_from_logits` (and take its mean)
    when both models' full logits are at hand.
    """
    per_sequence = kl_k3_sequence(policy_logprobs, reference_logprobs, masks)
    if per_sequence.numel() == 0:
        raise ValueError("KL estimate needs at least one sequence")
    return float(per_sequence.mean())


def perplexity(nll_sum: float, token_count: int) -> float:
    """exp(total negative log-likelihood / token count), e.g. of a policy's samples under the reference model."""
    if token_count <= 0:
        raise ValueError(f"token_count = {token_count}: perplexity needs at least one scored token")
    return math.exp(nll_sum / token_count)


def _summary(values: Sequence[float], name: str) -> dict[str, float]:
    values = [float(value) for value in values]
    if not values:
        raise ValueError(f"cannot summarise an empty list of {name}")
    bad = [value for value in values if not math.isfinite(value)]
    if bad:
        raise ValueError(f"{name} contain {len(bad)} non-finite value(s), e.g. {bad[0]}")
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


def summarise_rewards(rewards: Sequence[float]) -> dict[str, float]:
    """``{mean, std, min, max}`` of sample rewards; std is the population std (ddof 0), as in the training metrics.

    This is spread over samples within one run, not uncertainty across
    seeds (see ``common/statistics.py``).
    """
    return _summary(rewards, "rewards")


def response_length_stats(lengths: Sequence[int], max_new_tokens: int | None = None) -> dict[str, float]:
    """``{mean, std, min, max}`` of response lengths in tokens, plus ``truncated_fraction`` given ``max_new_tokens``.

    ``truncated_fraction`` is the share of responses that used the whole
    token budget (cut off rather than finished), which inflates the mean
    length a verbosity-bias plot reads.
    """
    summary = _summary(lengths, "lengths")
    if max_new_tokens is not None:
        summary["truncated_fraction"] = sum(1 for length in lengths if length >= max_new_tokens) / len(lengths)
    return summary


def sequence_kl(policy_logprobs: Sequence[Sequence[float]], reference_logprobs: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Per-sequence KL(model || reference) of a model's own samples, from each completion token's logprob under
    both: ``k3`` (sum of exp(r) - 1 - r, r = ref - model; never negative, the estimate reported as KL) and ``k1``
    (sum of model - ref, the seed gpt2_hh_rlhf's E[log P - log P_ref]; unbiased too, but negative on some samples)."""
    if len(policy_logprobs) != len(reference_logprobs):
        raise ValueError(f"{len(policy_logprobs)} policy sequences but {len(reference_logprobs)} reference sequences")
    k3, k1 = [], []
    for index, (policy, reference) in enumerate(zip(policy_logprobs, reference_logprobs)):
        if len(policy) != len(reference):
            raise ValueError(f"sequence {index}: {len(policy)} policy logprobs but {len(reference)} reference logprobs")
        ratios = [r - p for p, r in zip(policy, reference)]
        k3.append(math.fsum(math.expm1(x) - x for x in ratios))
        k1.append(-math.fsum(ratios))
    return {"k3": k3, "k1": k1}


def evaluation_metrics(
    prompts: Sequence[str],
    completions: Sequence[str],
    lengths: Sequence[int],
    rewards: Sequence[float | None],
    *,
    samples_per_prompt: int,
    pass_k: Sequence[int] = (1,),
    pass_threshold: float = 0.5,
    components: dict[str, Sequence[float | None]] | None = None,
    categories: dict[str, str] | None = None,
    policy_logprobs: Sequence[Sequence[float]] | None = None,
    reference_logprobs: Sequence[Sequence[float]] | None = None,
    behaviour_logprobs: Sequence[Sequence[float]] | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, float | int]:
    """Every number an evaluation reports for one model, from its samples: K consecutive samples per prompt.

    - ``reward_mean``/``reward_std`` (population) over samples with a reward; ``invalid_count`` without one;
      ``reward/<source>_mean``/``_std`` per reward source (``components``: label -> score per sample);
    - ``kl`` / ``kl_std``: mean and population std over sequences of the k3 sum (:func:`sequence_kl`),
      ``kl_k1``: mean of the k1 sum, ``reference_perplexity``: exp of the reference's mean NLL per completion
      token, all when reference logprobs are given; ``logprob_gap``: mean |behaviour - policy| per token;
    - ``length_mean``/``length_std``/``truncated_fraction`` in tokens; ``distinct_1``, ``distinct_2``,
      ``self_bleu`` over all completions;
    - ``pass@k`` for each k (an invalid sample counts as a failure);
    - ``category/<name>/reward_mean`` and ``category/<name>/samples`` (``categories``: prompt -> category).
    """
    n = len(prompts)
    if not (len(completions) == len(lengths) == len(rewards) == n):
        raise ValueError(f"prompts, completions, lengths and rewards need one entry per sample; got "
                         f"{n}, {len(completions)}, {len(lengths)}, {len(rewards)}")
    if n == 0 or n % samples_per_prompt:
        raise ValueError(f"{n} samples is not a positive multiple of samples_per_prompt = {samples_per_prompt}")
    valid = [reward for reward in rewards if reward is not None]
    if not valid:
        raise ValueError(f"none of the {n} samples has a reward; see the reward errors")
    reward_summary = summarise_rewards(valid)
    metrics: dict[str, float | int] = {
        "prompts": n // samples_per_prompt, "samples": n,
        "reward_mean": reward_summary["mean"], "reward_std": reward_summary["std"], "invalid_count": n - len(valid),
    }
    for label, scores in (components or {}).items():
        scored = [score for score in scores if score is not None]
        if scored:
            metrics[f"reward/{label}_mean"] = statistics.fmean(scored)
            metrics[f"reward/{label}_std"] = statistics.pstdev(scored)
    if reference_logprobs is not None:
        if policy_logprobs is None:
            raise ValueError("reference logprobs without policy logprobs: KL needs both")
        kl = sequence_kl(policy_logprobs, reference_logprobs)
        tokens = sum(len(sequence) for sequence in reference_logprobs)
        metrics.update(kl=statistics.fmean(kl["k3"]), kl_std=statistics.pstdev(kl["k3"]), kl_k1=statistics.fmean(kl["k1"]),
                       reference_perplexity=perplexity(-math.fsum(x for seq in reference_logprobs for x in seq), tokens))
    if behaviour_logprobs is not None and policy_logprobs is not None:
        gaps = [abs(b - p) for seq_b, seq_p in zip(behaviour_logprobs, policy_logprobs, strict=True)
                for b, p in zip(seq_b, seq_p, strict=True)]
        metrics["logprob_gap"] = statistics.fmean(gaps) if gaps else 0.0
    length_summary = response_length_stats(lengths, max_new_tokens)
    metrics.update(length_mean=length_summary["mean"], length_std=length_summary["std"])
    if max_new_tokens is not None:
        metrics["truncated_fraction"] = length_summary["truncated_fraction"]
    metrics.update(distinct_1=distinct_n(completions, 1), distinct_2=distinct_n(completions, 2))
    metrics["self_bleu"] = self_bleu(completions) if n >= 2 else 0.0
    failing = float("-inf")
    per_prompt = [[r if r is not None else failing for r in rewards[i:i + samples_per_prompt]]
                  for i in range(0, n, samples_per_prompt)]
    for k in pass_k:
        metrics[f"pass@{k}"] = pass_at_k(per_prompt, k, pass_threshold)
    if categories:
        by_category: dict[str, list[float]] = {}
        for prompt, reward in zip(prompts, rewards):
            if reward is not None and prompt in categories:
                by_category.setdefault(categories[prompt], []).append(reward)
        for name, values in sorted(by_category.items()):
            metrics[f"category/{name}/reward_mean"] = statistics.fmean(values)
            metrics[f"category/{name}/samples"] = len(values)
    return metrics
