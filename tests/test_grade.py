"""GRADE / GRADE-STE on the tiny offline Llama: the relaxation, relaxed generation with aligned KL,
truncated backprop, gradient variance, and short training runs that raise a classifier reward."""

import json
import math
import random
import statistics

import pytest
import torch

from raylign.learner.grade import (
    Reference,
    exact_kl,
    grade_loss,
    gradient_variance,
    gumbel_noise,
    gumbel_softmax_sample,
    peak_memory_bytes,
    relaxed_generate,
    tau_at,
    write_gradient_variance,
)

torch.set_num_threads(1)

PROMPTS = ["the movie was", "I watched this last night and the plot", "Overall, the cast"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32), torch.as_tensor(expected, dtype=torch.float32),
                               atol=atol, rtol=0)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def lora_policy(path, *, fresh=True, targets=ALL_LINEAR, seed=0):
    """A PEFT policy; `fresh` keeps LoRA's B = 0 (policy equals reference), else both factors are random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=fresh)
    return get_peft_model(model, config).eval()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def grads(parameters):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in parameters]


# ----- the relaxation -----


def test_ste_forward_is_the_hard_sample_under_the_same_noise():
    logits = torch.randn(4, 7, 50, generator=torch.Generator().manual_seed(0), requires_grad=True)
    noise = gumbel_noise(logits.shape, generator=torch.Generator().manual_seed(1))
    y, _, y_hard = gumbel_softmax_sample(logits, tau=1.5, noise=noise, straight_through=True)
    expected = torch.nn.functional.one_hot((logits + noise).argmax(-1), 50).float()
    assert torch.equal(y_hard, expected)
    close(y, expected, atol=1e-6)
    # The backward pass is the soft sample's.
    weights = torch.randn(4, 7, 50)
    (y * weights).sum().backward()
    ste_grad = logits.grad.clone()
    logits.grad = None
    (gumbel_softmax_sample(logits, tau=1.5, noise=noise)[0] * weights).sum().backward()
    close(ste_grad, logits.grad)


def test_soft_sample_approaches_the_one_hot_as_tau_goes_to_zero():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    noise = gumbel_noise(logits.shape, generator=torch.Generator().manual_seed(1))
    _, soft_warm, hard = gumbel_softmax_sample(logits, tau=2.0, noise=noise)
    _, soft_cold, _ = gumbel_softmax_sample(logits, tau=1e-3, noise=noise)
    assert (soft_warm - hard).abs().max() > 0.1
    assert (soft_cold - hard).abs().max() < 1e-3


def test_top_k_keeps_the_relaxed_sample_inside_the_top_k_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    noise = torch.tensor([[10.0, 0.0, 0.0, 0.0, 10.0]])  # would pick token 0 or 4 without the restriction
    _, y_soft, y_hard = gumbel_softmax_sample(logits, tau=1.0, noise=noise, top_k=2)
    assert y_hard.argmax().item() == 1
    assert y_soft[0, [0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    close(y_soft.sum(), 1.0)


def test_tau_schedule_is_linear_from_start_to_end_then_constant():
    assert [tau_at(s) for s in (0, 250, 500, 1000, 5000)] == [2.0, 1.625, 1.25, 0.5, 0.5]
    assert tau_at(5, tau_start=1.0, tau_end=0.1, anneal_steps=10) == pytest.approx(0.55)
    assert tau_at(3, anneal_steps=0) == 0.5
    with pytest.raises(ValueError, match="must be > 0"):
        tau_at(0, tau_end=0.0)


def test_exact_kl_matches_hand_value_and_ignores_tokens_both_rule_out():
    p = torch.tensor([[math.log(0.5), math.log(0.5), float("-inf")]], requires_grad=True)
    q = torch.tensor([[math.log(0.25), math.log(0.75), float("-inf")]])
    kl = exact_kl(p, q)
    close(kl, [0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75)])
    kl.sum().backward()
    assert torch.isfinite(p.grad).all()


# ----- relaxed generation -----


def test_kl_is_zero_at_step_zero_when_the_policy_equals_the_reference(tiny_model_dir, prompts):
    policy = lora_policy(tiny_model_dir, fresh=True)
    out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=5, tau=1.0,
                           generator=torch.Generator().manual_seed(0))
    assert out.kl.shape == (3, 5)
    assert out.kl.abs().max() < 1e-6


def test_kl_compares_policy_and_reference_on_the_same_context(tiny_model_dir, prompts):
    """The KL at step t equals the exact KL of a plain forward over prompt + hard tokens, read at the same position."""
    policy = lora_policy(tiny_model_dir, fresh=False)
    out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=6, tau=1.0,
                           straight_through=True, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([prompts.input_ids, out.tokens], dim=1)
    mask = torch.cat([prompts.attention_mask, torch.ones_like(out.tokens)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        policy_logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with policy.disable_adapter():
            reference_logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    start = prompts.input_ids.shape[1] - 1
    expected = exact_kl(policy_logits[:, start:-1], reference_logits[:, start:-1])
    assert expected.min() > 1e-3  # the adapter changes the policy, so a misaligned KL would show
    close(out.kl, expected, atol=2e-6)


def test_a_separate_reference_model_gives_the_same_kl_as_the_disabled_adapter(tiny_model_dir, prompts):
    from transformers import AutoModelForCausalLM

    policy = lora_policy(tiny_model_dir, fresh=False)
    frozen = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval().requires_grad_(False)
    kwargs = dict(max_new_tokens=4, tau=0.7, noise=gumbel_noise((3, 4, 512), generator=torch.Generator().manual_seed(2)))
    disabled = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, **kwargs)
    separate = relaxed_generate(policy, Reference(frozen), prompts.input_ids, prompts.attention_mask, **kwargs)
    close(separate.kl, disabled.kl)


def test_reference_none_needs_a_peft_policy(tiny_model_dir, prompts):
    from transformers import AutoModelForCausalLM

    with pytest.raises(TypeError, match="needs a PEFT policy"):
        relaxed_generate(AutoModelForCausalLM.from_pretrained(tiny_model_dir), None, prompts.input_ids,
                         prompts.attention_mask, max_new_tokens=2, tau=1.0)


def test_gradients_reach_the_adapter_and_not_the_frozen_weights(tiny_model_dir, prompts):
    from raylign.common.reward_models import ClassifierRewardModel

    policy = lora_policy(tiny_model_dir, fresh=True)
    reward_model = ClassifierRewardModel.from_base(tiny_model_dir).eval().requires_grad_(False)
    out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=5, tau=1.0,
                           generator=torch.Generator().manual_seed(0))
    probs, mask = out.sequence_for_reward()
    loss, _ = grade_loss(reward_model.reward_from_distributions(probs, mask), out.kl, out.completion_mask, beta=0.1)
    loss.backward()
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    frozen = [p for n, p in policy.named_parameters() if "lora_" not in n]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(p.grad is None for p in reward_model.parameters())


def _recompute_generate(policy, prompt_ids, prompt_mask, noise, tau, straight_through):
    """Relaxed generation without a cache: a full forward over the whole prefix at every step."""
    embedding = policy.get_input_embeddings()
    inputs, mask = embedding(prompt_ids), prompt_mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    ys = []
    for t in range(noise.shape[1]):
        logits = policy(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).logits[:, -1]
        y, _, _ = gumbel_softmax_sample(logits, tau, noise=noise[:, t], straight_through=straight_through)
        ys.append(y)
        inputs = torch.cat([inputs, (y @ embedding.weight).unsqueeze(1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("straight_through", [False, True])
def test_kv_cache_and_per_step_checkpointing_give_the_gradients_of_a_full_recompute(tiny_model_dir, prompts, straight_through):
    policy = lora_policy(tiny_model_dir, fresh=False)
    parameters = trainable(policy)
    noise = gumbel_noise((3, 5, 512), generator=torch.Generator().manual_seed(3))
    weights = torch.randn(3, 5, 512, generator=torch.Generator().manual_seed(4))

    ys = _recompute_generate(policy, prompts.input_ids, prompts.attention_mask, noise, 0.8, straight_through)
    (ys * weights).sum().backward()
    expected = grads(parameters)
    for checkpointed in (False, True):
        policy.zero_grad(set_to_none=True)
        out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=5, tau=0.8,
                               straight_through=straight_through, noise=noise, gradient_checkpointing=checkpointed)
        close(out.token_probs, ys.detach(), atol=1e-5)
        (out.token_probs * weights).sum().backward()
        for actual, wanted in zip(grads(parameters), expected):
            close(actual, wanted, atol=1e-5)


def test_checkpointing_keeps_the_kl_gradient_through_the_reference(tiny_model_dir, prompts):
    policy = lora_policy(tiny_model_dir, fresh=False)
    parameters = trainable(policy)
    noise = gumbel_noise((3, 4, 512), generator=torch.Generator().manual_seed(5))
    results = []
    for checkpointed in (False, True):
        policy.zero_grad(set_to_none=True)
        out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=4, tau=1.0,
                               noise=noise, gradient_checkpointing=checkpointed)
        out.kl.sum().backward()
        results.append(grads(parameters))
    assert sum(g.abs().sum() for g in results[0]) > 0
    for plain, checkpointed in zip(*results):
        close(checkpointed, plain, atol=1e-6)


def test_transformers_gradient_checkpointing_is_refused_with_the_fix(tiny_model_dir, prompts):
    policy = lora_policy(tiny_model_dir).train()
    policy.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing=True to relaxed_generate"):
        relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=2, tau=1.0)


def test_backprop_window_gives_no_gradient_to_the_steps_before_it(tiny_model_dir, prompts):
    policy = lora_policy(tiny_model_dir, fresh=False)
    parameters = trainable(policy)
    noise = gumbel_noise((3, 6, 512), generator=torch.Generator().manual_seed(6))
    weights = torch.randn(3, 6, 512, generator=torch.Generator().manual_seed(7))

    def run(window, early_scale=0.0, late_scale=1.0):
        policy.zero_grad(set_to_none=True)
        out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=6, tau=1.0,
                               noise=noise, backprop_window=window)
        late = (out.token_probs[:, 4:] * weights[:, 4:]).sum() + out.kl[:, 4:].sum()
        early = (out.token_probs[:, :4] * weights[:, :4]).sum() + out.kl[:, :4].sum()
        (late_scale * late + early_scale * early).backward()
        return grads(parameters)

    windowed = run(2)
    assert sum(g.abs().sum() for g in windowed) > 0
    # Steps outside the window are constants: they alone give no gradient, and weighting them changes nothing.
    assert all(g.abs().sum() == 0 for g in run(2, early_scale=1.0, late_scale=0.0))
    for a, b in zip(windowed, run(2, early_scale=100.0)):
        close(a, b, atol=0)
    # A window as long as the generation is full backprop; a shorter one drops the earlier paths.
    full, whole_window = run(None), run(6)
    for a, b in zip(full, whole_window):
        close(a, b, atol=0)
    assert sum((a - b).abs().sum() for a, b in zip(windowed, full)) > 1e-4


def test_generation_masks_tokens_after_eos_and_never_ends_before_min_new_tokens(tiny_model_dir, prompts):
    policy = lora_policy(tiny_model_dir)
    eos = 2
    noise = gumbel_noise((3, 6, 512), generator=torch.Generator().manual_seed(8))
    noise[:, :, eos] = -1e4
    noise[:, 0, eos] = 1e4  # wanted at step 0, but min_new_tokens forbids it
    noise[0, 2, eos] = 1e4
    noise[1, 4, eos] = 1e4
    out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=6, tau=1.0,
                           noise=noise, eos_token_id=eos, min_new_tokens=1)
    assert out.tokens[:, 0].ne(eos).all()
    assert out.tokens[0, 2] == eos and out.tokens[1, 4] == eos
    assert out.completion_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # With EOS forbidden the first step's token probabilities put no mass on it.
    assert out.token_probs[:, 0, eos].max() == 0.0


def test_generation_stops_once_every_row_has_ended(tiny_model_dir, prompts):
    policy = lora_policy(tiny_model_dir)
    noise = gumbel_noise((3, 8, 512), generator=torch.Generator().manual_seed(9))
    noise[:, 2, 2] = 1e4
    out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=8, tau=1.0,
                           noise=noise, eos_token_id=2)
    assert out.tokens.shape == (3, 3) and out.kl.shape == (3, 3)


def test_soft_reward_of_ste_tokens_equals_the_reward_of_the_hard_text(tiny_model_dir, tokenizer, prompts):
    from raylign.common.reward_models import ClassifierRewardModel

    torch.manual_seed(0)
    reward_model = ClassifierRewardModel.from_base(tiny_model_dir).eval().requires_grad_(False)
    policy = lora_policy(tiny_model_dir)
    out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=5, tau=1.0,
                           straight_through=True, generator=torch.Generator().manual_seed(0))
    probs, mask = out.sequence_for_reward()
    rows = [ids[m.bool()].tolist() + toks.tolist()
            for ids, m, toks in zip(prompts.input_ids, prompts.attention_mask, out.tokens)]
    assert [r[:len(row)] for r, row in zip(probs.argmax(-1).tolist(), rows)] == rows
    with torch.no_grad():
        hard = reward_model.reward(**reward_model._collate(rows))
        soft = reward_model.reward_from_distributions(probs, mask)
    close(soft, hard, atol=1e-5)


# ----- loss -----


def test_grade_loss_is_minus_mean_reward_plus_beta_token_mean_kl():
    reward = torch.tensor([0.2, 0.6])
    kl = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, stats = grade_loss(reward, kl, mask, beta=0.5, tau=1.25)
    # -0.4 + 0.5 * (1 + 3 + 2) / 3
    close(loss, 0.6)
    assert stats["reward_soft"] == pytest.approx(0.4)
    assert stats["kl"] == pytest.approx(2.0)
    assert stats["kl_sequence"] == pytest.approx(3.0)  # (4 + 2) / 2
    assert stats["tau"] == 1.25
    summed, _ = grade_loss(reward, kl, mask, beta=0.5, aggregation="constant", max_new_tokens=1)
    close(summed, -0.4 + 0.5 * 3.0)


# ----- measurement -----


def test_gradient_variance_matches_hand_values_and_restores_the_callers_grads(tmp_path):
    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.full_like(model.weight, 7.0)
    # Loss -(w . x_i + b) has gradient (-x_i, -1): coordinates (-1, -3), (0, 0), (-1, -1) over the 2 batches.
    inputs = torch.tensor([[1.0, 0.0], [3.0, 0.0]])

    def grad_fn(index):
        (-model(inputs[index])).sum().backward()

    result = gradient_variance(grad_fn, 2, model.parameters())
    # Unbiased variances: ((-1 + 2)^2 + (-3 + 2)^2) / 1 = 2, then 0 and 0.
    assert result["trace_covariance"] == pytest.approx(2.0)
    assert result["mean_grad_norm"] == pytest.approx((math.sqrt(2.0) + math.sqrt(10.0)) / 2)
    assert result["mean_gradient_sq_norm"] == pytest.approx(5.0)  # ||(-2, 0, -1)||^2
    assert result["mean_gradient_sq_norm_unbiased"] == pytest.approx(4.0)
    assert result["variance_ratio"] == pytest.approx(0.4)
    assert result["num_parameters"] == 3 and result["num_batches"] == 2
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 7.0)) and model.bias.grad is None
    path = write_gradient_variance(tmp_path / "out" / "gradient_variance.json", {"method": "grade", **result})
    assert json.loads(path.read_text())["trace_covariance"] == pytest.approx(2.0)


def test_gradient_variance_of_a_noisy_linear_model_recovers_the_noise_trace():
    """Per batch the gradient is mu + sigma * noise in 4 coordinates: tr Cov = 4 sigma^2."""
    sigma, mu = 0.5, torch.tensor([1.0, -2.0, 0.0, 2.0])
    weight = torch.zeros(4, requires_grad=True)
    generator = torch.Generator().manual_seed(0)

    def grad_fn(_):
        target = mu + sigma * torch.randn(4, generator=generator)
        (weight * target).sum().backward()

    result = gradient_variance(grad_fn, 4000, [weight])
    assert result["trace_covariance"] == pytest.approx(4 * sigma**2, rel=0.05)
    assert result["mean_gradient_sq_norm_unbiased"] == pytest.approx(9.0, rel=0.02)
    assert result["variance_ratio"] == pytest.approx(1.0 / 9.0, rel=0.06)


def test_peak_memory_bytes_reports_the_process_peak():
    assert peak_memory_bytes("cpu") > 10 * 2**20


# ----- training -----

POSITIVE = ["great", "wonderful", "brilliant", "excellent", "charming", "lovely", "fantastic", "delightful"]
NEGATIVE = ["bad", "boring", "awful", "terrible", "dull", "stupid", "horrible", "painful"]
SUBJECTS = ["the movie", "this film", "the acting", "the story", "the plot", "the ending", "the cast", "the music"]


@pytest.fixture(scope="module")
def sentiment_reward_model(tiny_model_dir, tokenizer):
    """The seed's classifier RM (frozen body, mean pool, MLP head) with its head trained on praise vs criticism."""
    from raylign.common.preference_data import PreferenceExample
    from raylign.common.reward_models import ClassifierRewardModel
    from raylign.learner.reward_training import train_reward_classifier

    rng = random.Random(0)

    def review(label):
        words = POSITIVE if label else NEGATIVE
        return PreferenceExample(prompt="", label=label,
                                 extra={"text": f"{rng.choice(SUBJECTS)} was {rng.choice(words)} and {rng.choice(words)}."})

    torch.manual_seed(0)
    model = ClassifierRewardModel.from_base(tiny_model_dir, dropout=0.0)
    history = train_reward_classifier(model, tokenizer, [review(i % 2) for i in range(128)], steps=80, batch_size=16,
                                      learning_rate=3e-3, max_length=32, seed=0)
    assert history[-1]["accuracy"] == 1.0
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("straight_through", [False, True], ids=["grade", "grade-ste"])
def test_grade_raises_the_classifier_reward_of_hard_decoded_text(tiny_model_dir, tokenizer, sentiment_reward_model,
                                                                   straight_through):
    rm = sentiment_reward_model
    # A random tiny model's next-token distribution is near uniform; adapting lm_head too lets 30 steps move it.
    policy = lora_policy(tiny_model_dir, targets=[*ALL_LINEAR, "lm_head"])
    optimizer = torch.optim.Adam(trainable(policy), lr=1e-2)
    prompts = tokenizer([f"{s} was" for s in SUBJECTS] * 2, return_tensors="pt", padding=True)
    generator = torch.Generator().manual_seed(1)

    def hard_reward(seed):
        with torch.no_grad():
            out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=8, tau=1.0,
                                   generator=torch.Generator().manual_seed(seed))
            probs, mask = out.sequence_for_reward()
            return float(rm.reward(probs.argmax(-1), mask).mean())

    before = statistics.fmean(hard_reward(seed) for seed in (100, 101))
    history = []
    for step in range(30):
        tau = tau_at(step, tau_start=2.0, tau_end=0.5, anneal_steps=30)
        out = relaxed_generate(policy, None, prompts.input_ids, prompts.attention_mask, max_new_tokens=8, tau=tau,
                               straight_through=straight_through, generator=generator)
        probs, mask = out.sequence_for_reward()
        loss, stats = grade_loss(rm.reward_from_distributions(probs, mask), out.kl, out.completion_mask, beta=0.01, tau=tau)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(stats)
    after = statistics.fmean(hard_reward(seed) for seed in (100, 101))
    assert history[0]["kl"] < 1e-6 < history[-1]["kl"]
    assert after > before + 0.2, (before, after)

