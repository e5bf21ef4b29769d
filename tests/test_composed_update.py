"""The composed update against a deliberately plain reference written from the papers' formulas.

One `LearnerWorker.train_step` on a fixed batch must give the loss and the gradient of the reference,
for every method, every loss aggregation and every micro-batch size (dividing the batch or not):
micro-batching only splits the work. The reference scores each sample alone (no padding, no batching),
in a loop, with no code shared with the learner beyond the model itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from raylign.common.config import load_config
from raylign.common.types import PromptItem, Sample
from raylign.learner.learner_worker import LearnerWorker

torch.set_num_threads(1)

K = 4
TEMPERATURE = 0.8
MIN_NEW_TOKENS = 2
MAX_NEW_TOKENS = 9
BETA = 0.05
REWARDS = [0.1, 0.9, 0.4, 0.4, 1.0, 0.0, 0.3, 0.7, 0.2, 0.2, 0.8, 0.5]
COMPLETION_LENGTHS = [1 + (7 * i) % 9 for i in range(12)]  # 1..9 tokens


def fixed_samples(prompt_ids: list[list[int]]) -> list[Sample]:
    generator = torch.Generator().manual_seed(3)
    samples = []
    for i, length in enumerate(COMPLETION_LENGTHS):
        completion = torch.randint(4, 500, (length,), generator=generator).tolist()  # no special token
        samples.append(Sample(prompt_index=i // K, sample_index=i % K, prompt="", prompt_ids=prompt_ids[i // K],
                              completion="", completion_ids=completion, behaviour_logprobs=[0.0] * length,
                              policy_version=0, finish_reason="length"))
    return samples


def make_learner(model_dir: str, method: str, aggregation: str, micro_batch_size: int, **algorithm) -> LearnerWorker:
    overrides = [
        f"model.path={model_dir}", "rollout.backend=hf", f"algorithm.name={method}", f"algorithm.kl_coef={BETA}",
        f"algorithm.loss_aggregation={aggregation}", f"train.micro_batch_size={micro_batch_size}",
        f"rollout.temperature={TEMPERATURE}", f"rollout.min_new_tokens={MIN_NEW_TOKENS}",
        f"rollout.max_new_tokens={MAX_NEW_TOKENS}", f"rollout.samples_per_prompt={K}", "train.prompts_per_step=3",
        *[f"algorithm.{key}={value}" for key, value in algorithm.items()],
    ]
    config = load_config("configs/quickstart.yaml", overrides)
    learner = LearnerWorker(model_dir, config.model, config.train, config.algorithm, config.rollout, seed=0)
    learner.attach_lora()
    # Random LoRA B and value head: the policy differs from the reference and values are not 0.
    generator = randomise_lora_b(learner, 0.3)
    with torch.no_grad():
        for parameter in learner.value_head.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return learner


def randomise_lora_b(learner: LearnerWorker, scale: float) -> torch.Generator:
    """Draw every LoRA B factor from N(0, scale^2) (seed 11); returns the generator to draw more from."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in learner.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return generator


def captured_gradient(learner: LearnerWorker, samples, rewards) -> tuple[dict, list[torch.Tensor]]:
    """train_step's metrics and the gradient it would apply (the optimizer step is replaced by a capture)."""
    captured = []

    def capture() -> float:
        captured.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in learner.trainable_parameters])
        learner.optimizer.zero_grad(set_to_none=True)
        return 0.0

    learner._optimizer_step = capture
    learner.reward_baseline = None
    learner.version = 0
    metrics = learner.train_step(samples, rewards)
    assert len(captured) == 1
    return metrics, captured[0]


# ----- the plain reference -----


def score_alone(learner, sample, *, reference=False, critic=None):
    """Completion-token logprobs (and values) of one sample, scored alone."""
    model, eos = learner.model, learner.tokenizer.eos_token_id
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    prompt_len = len(sample.prompt_ids)
    context = model.disable_adapter() if reference else learner.policy.active_adapter(critic) if critic else None
    with context if context is not None else torch.enable_grad():
        output = model(input_ids=ids, output_hidden_states=True)
    logits = output.logits[0, prompt_len - 1:-1].float() / TEMPERATURE
    logits[:MIN_NEW_TOKENS, eos] = -math.inf
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.completion_ids)[:, None]).squeeze(-1)
    hidden = output.hidden_states[-1][0, prompt_len - 1:-1]
    return logp, hidden


def aggregate(per_sequence_token_losses: list[torch.Tensor], aggregation: str) -> torch.Tensor:
    if aggregation == "token_mean":
        return torch.cat(per_sequence_token_losses).sum() / sum(len(x) for x in per_sequence_token_losses)
    if aggregation == "seq_mean_token_mean":
        return torch.stack([x.mean() for x in per_sequence_token_losses]).mean()
    return torch.cat(per_sequence_token_losses).sum() / (len(per_sequence_token_losses) * MAX_NEW_TOKENS)


def reference_loss(learner, samples, rewards, method: str, aggregation: str, critic: str = "value_head") -> torch.Tensor:
    logps, refs, hiddens = [], [], []
    for sample in samples:
        logp, hidden = score_alone(learner, sample)
        with torch.no_grad():
            ref, _ = score_alone(learner, sample, reference=True)
        if critic == "separate_adapter":
            _, hidden = score_alone(learner, sample, critic="critic")
        logps.append(logp)
        refs.append(ref)
        hiddens.append(hidden)
    ratios = [torch.exp(lp - lp.detach()) for lp in logps]  # on-policy: 1, with the policy's gradient
    r = torch.tensor(rewards)
    if method == "grpo":
        # GRPO (Shao et al. 2024): A_i = (r_i - mean_g) / std_g, k3 KL in the loss.
        groups = r.view(-1, K)
        advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, unbiased=False, keepdim=True) + 1e-6)).flatten()
        per_token = []
        for ratio, lp, ref, a in zip(ratios, logps, refs, advantages):
            k3 = torch.exp(ref - lp) - (ref - lp) - 1
            per_token.append(-ratio * a + BETA * k3)
        return aggregate(per_token, aggregation)
    # The other methods put -beta * k1 into the reward.
    k1 = [(lp.detach() - ref) for lp, ref in zip(logps, refs)]
    if method in ("reinforce", "rloo"):
        shaped = r - BETA * torch.stack([x.sum() for x in k1])
        if method == "reinforce":
            advantages = shaped - shaped.mean()  # baseline: the first batch's mean
        else:
            groups = shaped.view(-1, K)
            advantages = (groups - (groups.sum(1, keepdim=True) - groups) / (K - 1)).flatten()
        return aggregate([-ratio * a for ratio, a in zip(ratios, advantages)], aggregation)
    # PPO (Ziegler et al. 2019; Schulman et al. 2017): token rewards, GAE(gamma=1, lambda=0.95), whitened.
    values = [learner.value_head(h.float()).squeeze(-1) for h in hiddens]
    advantages, returns = [], []
    for score, kl, value in zip(r, k1, values):
        v = value.detach()
        token_rewards = -BETA * kl
        token_rewards[-1] += score
        a, running = torch.zeros_like(v), 0.0
        for t in reversed(range(len(v))):
            next_value = v[t + 1] if t + 1 < len(v) else 0.0
            running = token_rewards[t] + next_value - v[t] + 0.95 * running
            a[t] = running
        advantages.append(a)
        returns.append(a + v)
    flat = torch.cat(advantages)
    mean, var = flat.mean(), flat.var(unbiased=False)
    whitened = [(a - mean) / torch.sqrt(var + 1e-8) for a in advantages]
    policy = aggregate([-ratio * a for ratio, a in zip(ratios, whitened)], aggregation)
    value_losses = torch.cat([0.5 * (value - ret) ** 2 for value, ret in zip(values, returns)])
    return policy + learner.algorithm.value_coef * value_losses.mean()


def reference_gradient(learner, samples, rewards, method, aggregation, critic="value_head"):
    learner.optimizer.zero_grad(set_to_none=True)
    loss = reference_loss(learner, samples, rewards, method, aggregation, critic)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in learner.trainable_parameters]
    learner.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def assert_same_gradient(actual, expected, what):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


# ----- the tests -----


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["the movie was", "I watched this last night and the plot was", "Overall"]
    return fixed_samples([tokenizer(p).input_ids for p in prompts])


METHODS = [("grpo", "value_head"), ("ppo", "value_head"), ("ppo", "separate_adapter"), ("reinforce", "value_head"),
           ("rloo", "value_head")]


@pytest.mark.parametrize("method,critic", METHODS, ids=[f"{m}-{c}" for m, c in METHODS])
def test_train_step_matches_the_plain_reference_for_every_aggregation_and_micro_batch_size(
        tiny_model_dir, batch, method, critic):
    for aggregation in ("token_mean", "seq_mean_token_mean", "constant"):
        learner = make_learner(tiny_model_dir, method, aggregation, 12, critic=critic)
        expected_loss, expected = reference_gradient(learner, batch, REWARDS, method, aggregation, critic)
        # 12 divides into 1, 2, 3, 4, 6 and 12; 5 leaves a micro-batch of 2.
        for micro_batch_size in (12, 5, 4, 3, 1):
            learner.train_config.micro_batch_size = micro_batch_size
            metrics, actual = captured_gradient(learner, batch, REWARDS)
            what = f"{method}/{critic} {aggregation} micro_batch_size={micro_batch_size}"
            assert math.isclose(metrics["loss"], expected_loss, rel_tol=1e-5, abs_tol=1e-6), what
            assert_same_gradient(actual, expected, what)


def test_minibatches_normalise_by_their_own_counts_whatever_the_micro_batching(tiny_model_dir, batch):
    """Two minibatches: each optimizer step's gradient is the plain reference on that minibatch alone."""
    learner = make_learner(tiny_model_dir, "grpo", "token_mean", 12, num_minibatches=2)
    shuffle_state = learner.shuffle_rng.get_state()
    order = torch.randperm(len(batch), generator=learner.shuffle_rng)
    gradients = {}
    for micro_batch_size in (12, 4, 1):
        learner.shuffle_rng.set_state(shuffle_state)
        learner.train_config.micro_batch_size = micro_batch_size
        captured = []

        def capture() -> float:
            captured.append([p.grad.clone() for p in learner.trainable_parameters])
            learner.optimizer.zero_grad(set_to_none=True)
            return 0.0

        learner._optimizer_step = capture
        learner.version = 0
        learner.train_step(batch, REWARDS)
        gradients[micro_batch_size] = captured
    for micro_batch_size in (4, 1):
        for a, b in zip(gradients[micro_batch_size], gradients[12]):
            assert_same_gradient(a, b, f"minibatch gradient, micro_batch_size={micro_batch_size}")
    # The first minibatch's gradient is the reference over its rows, with its own GRPO groups' advantages.
    first = order[:6].tolist()
    r = torch.tensor(REWARDS).view(-1, K)
    advantages = ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-6)).flatten()
    learner.optimizer.zero_grad(set_to_none=True)
    per_token = []
    for i in first:
        logp, _ = score_alone(learner, batch[i])
        with torch.no_grad():
            ref, _ = score_alone(learner, batch[i], reference=True)
        per_token.append(-torch.exp(logp - logp.detach()) * advantages[i] + BETA * (torch.exp(ref - logp) - (ref - logp) - 1))
    aggregate(per_token, "token_mean").backward()
    assert_same_gradient(gradients[12][0], [p.grad for p in learner.trainable_parameters], "first minibatch")


def test_the_first_reinforce_update_uses_the_batch_mean_as_baseline(tiny_model_dir, batch):
    learner = make_learner(tiny_model_dir, "reinforce", "token_mean", 12, kl_placement="loss", kl_coef=0.0)
    raised = [reward + 10.0 for reward in REWARDS]
    # Shifting every reward by a constant changes nothing when the baseline is the batch mean.
    _, plain = captured_gradient(learner, batch, REWARDS)
    _, shifted = captured_gradient(learner, batch, raised)
    assert_same_gradient(shifted, plain, "reinforce, rewards + 10")
    learner.reward_baseline, learner.version = None, 0
    learner.train_step(batch, REWARDS)
    assert math.isclose(learner.reward_baseline, sum(REWARDS) / len(REWARDS), rel_tol=1e-6)


def test_grpo_std_convention_and_single_sample_groups_are_config_choices():
    from raylign.learner.update import sequence_advantages

    scores = torch.tensor([0.0, 1.0, 1.0, 0.0, 5.0])
    population = sequence_advantages("grpo", scores, [4, 1], advantage_std="population")
    unbiased = sequence_advantages("grpo", scores, [4, 1], advantage_std="unbiased")
    # Group std over K=4: population 0.5, unbiased sqrt(1/3); the ratio is sqrt(4/3) = 1.155.
    torch.testing.assert_close(population[:4], torch.tensor([-1.0, 1.0, 1.0, -1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(population[:4] / unbiased[:4], torch.full((4,), math.sqrt(4 / 3)), atol=1e-5, rtol=0)
    assert population[4] == 0.0
    assert sequence_advantages("grpo", scores, [4, 1], single_sample_groups="score")[4] == 5.0
    assert sequence_advantages("rloo", scores, [4, 1], single_sample_groups="score")[4] == 5.0


def test_k1_in_the_loss_is_refused_with_the_reason():
    from raylign.common.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="zero in expectation"):
        load_config("configs/quickstart.yaml", ["algorithm.kl_estimator=k1", "model.path=builtin:tiny-llama"])
    config = load_config("configs/quickstart.yaml", ["algorithm.kl_estimator=k1", "algorithm.kl_placement=reward"])
    assert config.algorithm.kl_in_reward


@pytest.mark.parametrize("method", ["grpo", "reinforce", "ppo"])
def test_no_kl_term_skips_the_reference_forward_and_keeps_the_update(tiny_model_dir, batch, method, monkeypatch):
    """kl_coef 0: the reference is never scored, no KL is logged, and the gradient is the plain reference's
    with beta 0 (REINFORCE puts its KL in the reward, so its old-logprob pass goes too)."""
    import raylign.learner.update as update

    learner = make_learner(tiny_model_dir, method, "token_mean", 5, kl_coef=0.0)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference was scored with no KL term on")

    monkeypatch.setattr(learner.policy, "reference_score", refuse)
    assert update.needs_old_pass(learner.algorithm) == (method == "ppo")
    metrics, actual = captured_gradient(learner, batch, REWARDS)
    assert "kl" not in metrics and "kl_sequence" not in metrics
    monkeypatch.setitem(globals(), "BETA", 0.0)  # the plain reference's beta
    expected_loss, expected = reference_gradient(learner, batch, REWARDS, method, "token_mean")
    assert math.isclose(metrics["loss"], expected_loss, rel_tol=1e-5, abs_tol=1e-6), method
    assert_same_gradient(actual, expected, f"{method} without a KL term")
