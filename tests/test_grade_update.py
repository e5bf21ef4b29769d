"""GRADE's composed step in the learner: against a plain per-row reference, the backprop window counted
from the tokens each row generated, the soft reward pooled over the hard text's tokens, the adaptive KL
controller in samples, probes that leave training unchanged, and N data-parallel ranks that make the
update of one."""

from __future__ import annotations

import math

import pytest
import torch

from raylign.common.config import load_config
from raylign.common.types import PromptItem
from raylign.learner.data_parallel import SINGLE
from raylign.learner.grade import RowNoise, exact_kl, gumbel_noise, relaxed_generate
from raylign.learner.learner_worker import LearnerWorker
from tests.test_composed_update import randomise_lora_b
from tests.test_offline_data_parallel import run_ranks

torch.set_num_threads(1)

K, MAX_NEW_TOKENS, MIN_NEW_TOKENS, BETA, TAU = 2, 5, 1, 0.1, 1.5
PROMPTS = ["the movie was", "I watched this last night and the plot"]


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory):
    """An untrained classifier RM on the tiny model's body: any fixed differentiable reward will do."""
    from raylign.common.reward_models import ClassifierRewardModel

    torch.manual_seed(5)
    model = ClassifierRewardModel.from_base(tiny_model_dir, dropout=0.0)
    return str(model.save_pretrained(tmp_path_factory.mktemp("grade-classifier")))


def grade_learner(model_dir, classifier_dir, method="grade", **algorithm) -> LearnerWorker:
    overrides = [
        f"model.path={model_dir}", "rollout.backend=hf", f"algorithm.name={method}", f"algorithm.kl_coef={BETA}",
        f"algorithm.reward_model={classifier_dir}", f"algorithm.tau_start={TAU}", f"algorithm.tau_end={TAU}",
        f"rollout.max_new_tokens={MAX_NEW_TOKENS}", f"rollout.min_new_tokens={MIN_NEW_TOKENS}",
        f"rollout.samples_per_prompt={K}", "train.prompts_per_step=2", "sft.steps=0",
        *[f"algorithm.{key}={value}" for key, value in algorithm.items()],
    ]
    config = load_config("configs/quickstart.yaml", overrides)
    learner = LearnerWorker(model_dir, config.model, config.train, config.algorithm, config.rollout, seed=0)
    learner.attach_lora()
    randomise_lora_b(learner, 0.5)
    return learner


def prompt_items(learner) -> list[PromptItem]:
    return [PromptItem(index=i, text=p, token_ids=learner.tokenizer(p).input_ids, seed=i) for i, p in enumerate(PROMPTS)]


def plain_grade_loss(learner, prompts, noise_key: tuple, straight_through: bool) -> torch.Tensor:
    """GRADE from its definition, one row at a time, recomputing the whole context at every step (no cache,
    no padding): y_t = softmax((logits_t + g_t) / tau) [STE: hard forward], next input y_t @ E, exact
    KL(pi_t || ref_t) on the same context, reward = RM(prompt one-hots + y without the closing EOS)."""
    model, eos = learner.model, learner.tokenizer.eos_token_id
    embedding = model.get_input_embeddings().weight
    rows = [p for p in prompts for _ in range(K)]
    row_noise = RowNoise(noise_key, range(len(rows)), MAX_NEW_TOKENS, embedding.shape[0])
    noises = [row_noise.at(t) for t in range(MAX_NEW_TOKENS)]
    rewards, kls = [], []
    for index, prompt in enumerate(rows):
        prompt_embeds = embedding[torch.tensor(prompt.token_ids)]
        ys, row_kls = [], []
        for t in range(MAX_NEW_TOKENS):
            inputs = torch.cat([prompt_embeds, *[y[None] @ embedding for y in ys]])[None]
            logits = model(inputs_embeds=inputs).logits[0, -1].float()
            with model.disable_adapter():
                reference_logits = model(inputs_embeds=inputs).logits[0, -1].float()
            if t < MIN_NEW_TOKENS:
                logits[eos] = reference_logits[eos] = -math.inf
            row_kls.append(exact_kl(logits, reference_logits))
            perturbed = logits + noises[t][index]
            soft = torch.softmax(perturbed / TAU, -1)
            hard = torch.nn.functional.one_hot(perturbed.argmax(), soft.shape[-1]).float()
            ys.append((hard - soft).detach() + soft if straight_through else soft)
            if int(perturbed.argmax()) == eos:
                break
        kept = ys[:-1] if int(ys[-1].argmax()) == eos else ys
        one_hots = torch.nn.functional.one_hot(torch.tensor(prompt.token_ids), embedding.shape[0]).float()
        sequence = torch.cat([one_hots, torch.stack(kept)])[None]
        rewards.append(learner.reward_model.reward_from_distributions(sequence, torch.ones(sequence.shape[:2]))[0])
        kls.append(torch.stack(row_kls))
    return -torch.stack(rewards).mean() + BETA * torch.cat(kls).mean()


def gradient(learner, loss) -> list[torch.Tensor]:
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in learner.trainable_parameters]
    learner.optimizer.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("method", ["grade", "grade_ste"])
def test_grade_step_matches_a_plain_per_row_reference(tiny_model_dir, classifier_dir, method):
    learner = grade_learner(tiny_model_dir, classifier_dir, method)
    prompts = prompt_items(learner)
    loss, _, generation, _ = learner._grade_loss(prompts, 0, (7,), SINGLE)
    actual = gradient(learner, loss)
    expected_loss = plain_grade_loss(learner, prompts, (7,), method == "grade_ste")
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), atol=1e-5, rtol=1e-5)
    for a, e in zip(actual, gradient(learner, expected_loss)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def eos_noise(batch: int, vocab: int, eos: int, ends: list[int]) -> torch.Tensor:
    """Gumbel noise that makes row r emit EOS at step ends[r] and nothing special before."""
    noise = gumbel_noise((batch, MAX_NEW_TOKENS + 3, vocab), generator=torch.Generator().manual_seed(2))
    noise[:, :, eos] = -1e4
    for row, end in enumerate(ends):
        noise[row, end, eos] = 1e4
    return noise


def test_backprop_window_counts_back_from_the_tokens_each_row_generated(tiny_model_dir, classifier_dir):
    learner = grade_learner(tiny_model_dir, classifier_dir)
    policy, eos = learner.model, learner.tokenizer.eos_token_id
    prompts = learner.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    # Every row ends (step 1 and step 2) long before a window counted back from max_new_tokens=8.
    noise = eos_noise(2, 512, eos, [1, 2])
    out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=8, tau=1.0,
                           noise=noise, eos_token_id=eos, backprop_window=2)
    assert out.completion_mask.sum(-1).tolist() == [2.0, 3.0]
    for row in range(2):
        parameters = learner.trainable_parameters
        grads = torch.autograd.grad(out.kl[row].sum(), parameters, retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, f"row {row} got no gradient"
    # Row 1 generated 3 tokens: its first is before its 2-token window, a constant.
    grads = torch.autograd.grad(out.kl[1, 0], learner.trainable_parameters, retain_graph=True, allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads)
    # The window rows are exactly the rows the same noise gives without a window.
    full = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=8, tau=1.0,
                            noise=noise, eos_token_id=eos)
    torch.testing.assert_close(out.token_probs.detach(), full.token_probs.detach(), atol=0, rtol=0)


def test_a_window_without_given_noise_replays_the_same_draws(tiny_model_dir, classifier_dir):
    learner = grade_learner(tiny_model_dir, classifier_dir)
    prompts = learner.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=6, tau=1.0, eos_token_id=learner.tokenizer.eos_token_id)
    windowed = relaxed_generate(learner.model, None, prompts.input_ids, prompts.attention_mask, backprop_window=2,
                                generator=torch.Generator().manual_seed(4), **kwargs)
    plain = relaxed_generate(learner.model, None, prompts.input_ids, prompts.attention_mask,
                             generator=torch.Generator().manual_seed(4), **kwargs)
    assert torch.equal(windowed.tokens, plain.tokens)


def test_soft_reward_pools_over_the_hard_texts_tokens_without_eos(tiny_model_dir, classifier_dir):
    from raylign.common.reward_models import load_reward_model

    learner = grade_learner(tiny_model_dir, classifier_dir, "grade_ste")
    reward_model, eos = load_reward_model(classifier_dir, "classifier"), learner.tokenizer.eos_token_id
    prompts = learner.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = relaxed_generate(learner.model, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=6, tau=1.0,
                           straight_through=True, noise=eos_noise(2, 512, eos, [2, 5]), eos_token_id=eos)
    probs, mask = out.sequence_for_reward(eos_token_id=eos)
    hard_rows = []
    for ids, m, tokens, length in zip(prompts.input_ids, prompts.attention_mask, out.tokens, out.completion_mask.sum(-1)):
        completion = [t for t in tokens[: int(length)].tolist() if t != eos]
        hard_rows.append(ids[m.bool()].tolist() + completion)
    with torch.no_grad():
        soft = reward_model.reward_from_distributions(probs, mask)
        hard = reward_model.reward(**reward_model._collate(hard_rows))
        with_eos = reward_model.reward_from_distributions(*out.sequence_for_reward())
    torch.testing.assert_close(soft, hard, atol=1e-5, rtol=0)
    assert (with_eos - hard).abs().max() > 1e-6  # pooling over EOS would optimise another reward


def test_adaptive_kl_in_grade_moves_per_sample_like_the_policy_gradient_path(tiny_model_dir, classifier_dir):
    learner = grade_learner(tiny_model_dir, classifier_dir, kl_controller="adaptive", kl_target=1e-6, kl_horizon=100)
    before = learner.kl_controller.value
    _, metrics = learner.grade_step(prompt_items(learner), 0)
    error = min(max(metrics["kl_sequence"] / 1e-6 - 1, -0.2), 0.2)
    assert math.isclose(learner.kl_controller.value, before * (1 + error * len(PROMPTS) * K / 100), rel_tol=1e-9)


def test_gradient_variance_probes_leave_grade_training_unchanged(tiny_model_dir, classifier_dir):
    def two_steps(probe: bool) -> list[float]:
        learner = grade_learner(tiny_model_dir, classifier_dir)
        losses = [learner.grade_step(prompt_items(learner), 0)[1]["loss"]]
        if probe:
            learner.gradient_variance([prompt_items(learner)] * 2, 1)
        losses.append(learner.grade_step(prompt_items(learner), 1)[1]["loss"])
        return losses

    assert two_steps(probe=True) == two_steps(probe=False)


@pytest.mark.parametrize("method,world_size,algorithm", [
    ("grade", 2, {}),
    ("grade_ste", 3, {"backprop_window": 2, "kl_controller": "adaptive", "kl_target": 1e-6}),
], ids=["grade-2-ranks", "grade-ste-3-ranks-window"])
def test_grade_on_data_parallel_ranks_makes_the_update_and_the_samples_of_one_learner(
        tiny_model_dir, classifier_dir, method, world_size, algorithm):
    """Each rank relaxes its rows (4 rows over 3 ranks: 2, 1, 1) with the noise one learner gives them."""
    def two_steps(learner, ranks):
        learner.ranks = ranks
        steps = [learner.grade_step(prompt_items(learner), step) for step in range(2)]
        return steps, [p.detach().clone() for p in learner.trainable_parameters], learner.kl_controller.value

    (one_steps, one_weights, one_kl_coef), = run_ranks(1, lambda: grade_learner(tiny_model_dir, classifier_dir, method, **algorithm), two_steps)
    ranks = run_ranks(world_size, lambda: grade_learner(tiny_model_dir, classifier_dir, method, **algorithm), two_steps)
    for step, (one_samples, one_metrics) in enumerate(one_steps):
        samples = [sample for steps, _, _ in ranks for sample in steps[step][0]]
        assert [(s.prompt_index, s.sample_index, s.completion_ids) for s in samples] == \
            [(s.prompt_index, s.sample_index, s.completion_ids) for s in one_samples]
        for steps, _, _ in ranks:
            for key in ("loss", "reward_soft", "kl", "kl_sequence", "kl_coef", "grad_norm", "response_length_mean"):
                assert steps[step][1][key] == pytest.approx(one_metrics[key], rel=1e-5, abs=1e-6), (step, key)
    assert one_steps[1][1]["kl"] > 0
    for _, weights, kl_coef in ranks:
        assert kl_coef == pytest.approx(one_kl_coef, rel=1e-9)
        for actual, expected in zip(weights, one_weights, strict=True):
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
