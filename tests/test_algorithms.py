import math

import pytest
import torch

from raylign.learner import algorithms as alg


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# masked reductions


def test_masked_sum_and_mean_ignore_padding_even_when_it_holds_inf():
    x = torch.tensor([[1.0, 2.0, math.inf], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # valid: 1 + 2 + 4 = 7 over 3 tokens
    close(alg.masked_sum(x, mask), 7.0)
    close(alg.masked_mean(x, mask), 7.0 / 3.0)
    # per row: (1 + 2) / 2 = 1.5 and 4 / 1 = 4
    close(alg.masked_mean(x, mask, dim=-1), [1.5, 4.0])
    close(alg.masked_sum(x, mask.bool(), dim=-1), [3.0, 4.0])


def test_masked_mean_of_empty_row_is_zero_not_nan():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mean = alg.masked_mean(x, mask, dim=-1)
    close(mean.detach(), [1.5, 0.0])
    mean.sum().backward()
    close(x.grad, [[0.5, 0.5], [0.0, 0.0]])


def test_masked_whiten_gives_zero_mean_unit_variance_over_valid_tokens():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # valid 1, 3, 5, 7: mean 4, population var (9 + 1 + 1 + 9) / 4 = 5
    s = math.sqrt(5.0)
    whitened = alg.masked_whiten(x, mask, eps=0.0)
    close(whitened, [[-3 / s, -1 / s, 0.0], [1 / s, 3 / s, 0.0]])
    close(alg.masked_mean(whitened, mask), 0.0)
    close(alg.masked_mean(whitened**2, mask), 1.0)
    # shift_mean=False keeps the mean of 4, only rescales
    unshifted = alg.masked_whiten(x, mask, shift_mean=False, eps=0.0)
    close(unshifted, [[4 - 3 / s, 4 - 1 / s, 0.0], [4 + 1 / s, 4 + 3 / s, 0.0]])


# sequence-level advantages


def test_group_advantages_match_hand_computed_population_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group 1: mean 2, deviations (-1, 0, 1), std sqrt(2/3)
    # group 2: mean 2, deviations (-2, -2, 4), std sqrt((4 + 4 + 16) / 3) = sqrt(8)
    s1, s2 = math.sqrt(2 / 3), math.sqrt(8)
    adv = alg.group_advantages(rewards, group_size=3, eps=0.0)
    close(adv, [-1 / s1, 0.0, 1 / s1, -2 / s2, -2 / s2, 4 / s2])


def test_group_advantages_are_zero_mean_per_group():
    rewards = torch.tensor([0.3, -1.0, 2.5, 0.0, 7.0, 7.0, 1.0, -2.0])
    for scale in ("std", "none"):
        adv = alg.group_advantages(rewards, group_size=4, scale=scale)
        close(adv.view(2, 4).mean(dim=1), [0.0, 0.0], atol=1e-6)


def test_group_advantages_without_std_scaling_are_mean_centred_rewards():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # Dr.GRPO: r - group mean (2 and 2)
    close(alg.group_advantages(rewards, group_size=3, scale="none"), [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])


def test_group_advantages_of_identical_rewards_are_zero_not_nan():
    adv = alg.group_advantages(torch.tensor([5.0, 5.0, 5.0, 1.0]), group_size=1)
    close(adv, [0.0, 0.0, 0.0, 0.0])
    close(alg.group_advantages(torch.tensor([5.0, 5.0]), group_size=2), [0.0, 0.0])


def test_group_advantages_reject_batch_not_divisible_by_group_size():
    with pytest.raises(ValueError, match="not divisible by group_size=3"):
        alg.group_advantages(torch.zeros(5), group_size=3)
    with pytest.raises(ValueError, match="scale"):
        alg.group_advantages(torch.zeros(4), group_size=2, scale="max")


def test_rloo_advantages_use_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 1.0])
    # group 1 baselines: (2+3)/2 = 2.5, (1+3)/2 = 2, (1+2)/2 = 1.5
    # group 2 baselines: (4+1)/2 = 2.5, 2.5, (4+4)/2 = 4
    close(alg.rloo_advantages(rewards, group_size=3), [-1.5, 0.0, 1.5, 1.5, 1.5, -3.0])


def test_rloo_needs_at_least_two_samples_per_group():
    with pytest.raises(ValueError, match="group_size >= 2"):
        alg.rloo_advantages(torch.zeros(4), group_size=1)


def test_ema_update_starts_at_first_value_then_blends():
    running = alg.ema_update(None, 5.0, momentum=0.9)
    assert running == 5.0
    # 0.9 * 5 + 0.1 * 15 = 6
    assert alg.ema_update(running, 15.0, momentum=0.9) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="momentum"):
        alg.ema_update(1.0, 2.0, momentum=1.5)


def test_clip_advantages_clamps_symmetrically_and_none_is_identity():
    adv = torch.tensor([-3.0, 0.5, 2.0])
    close(alg.clip_advantages(adv, 1.0), [-1.0, 0.5, 1.0])
    assert alg.clip_advantages(adv, None) is adv
    with pytest.raises(ValueError, match="> 0"):
        alg.clip_advantages(adv, 0.0)


# KL estimators


def test_kl_estimators_match_hand_computed_values():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    l2 = math.log(2.0)
    # log ratios: +log 2, -log 2
    close(alg.kl_per_token(logp, ref, "k1"), [[l2, -l2]])
    close(alg.kl_per_token(logp, ref, "k2"), [[0.5 * l2**2, 0.5 * l2**2]])
    # k3 = exp(-lr) + lr - 1: 0.5 + log 2 - 1 and 2 - log 2 - 1
    close(alg.kl_per_token(logp, ref, "k3"), [[0.5 + l2 - 1, 2 - l2 - 1]])
    with pytest.raises(ValueError, match="k1"):
        alg.kl_per_token(logp, ref, "k4")


def test_k3_is_zero_when_policies_match_and_positive_otherwise():
    logp = torch.tensor([[-1.0, -2.0, -0.1]])
    close(alg.kl_per_token(logp, logp.clone(), "k3"), [[0.0, 0.0, 0.0]])
    k3 = alg.kl_per_token(logp, logp + torch.tensor([[0.3, -0.7, 2.0]]), "k3")
    assert (k3 > 0).all()


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.25, 0.5])
    # KL(p || q) = 0.5 log 2 + 0 + 0.25 log 0.5 = 0.25 log 2
    kl = 0.25 * math.log(2.0)
    for estimator in ("k1", "k3"):
        expectation = (p * alg.kl_per_token(p.log(), q.log(), estimator)).sum()
        close(expectation, kl)
    # k2 is biased: here 0.5 * (0.5 + 0 + 0.25) * log(2)^2
    close((p * alg.kl_per_token(p.log(), q.log(), "k2")).sum(), 0.375 * math.log(2.0) ** 2)


# policy loss


def _logps_with_ratios(ratios):
    old = torch.full((len(ratios), len(ratios[0])), -1.0)
    return old + torch.log(torch.tensor(ratios)), old


def test_clipped_surrogate_loss_matches_hand_computed_values():
    logp, old = _logps_with_ratios([[1.5, 0.5], [1.5, 0.5]])
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = alg.clipped_surrogate_loss(logp, old, adv, clip_low=0.2)
    # A=+1: r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped); r=0.5 -> max(-0.5, -0.8) = -0.5
    # A=-1: r=1.5 -> max(1.5, 1.2) = 1.5;               r=0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    close(loss, [[-1.2, -0.5], [1.5, 0.8]])
    assert clipped.tolist() == [[True, False], [False, True]]
    per_token_adv = adv.unsqueeze(-1).expand(2, 2)
    loss_bt, clipped_bt = alg.clipped_surrogate_loss(logp, old, per_token_adv, clip_low=0.2)
    close(loss_bt, loss)
    assert torch.equal(clipped_bt, clipped)


def test_clipped_tokens_get_no_gradient():
    logp, old = _logps_with_ratios([[1.5, 0.5], [1.5, 0.5]])
    logp.requires_grad_(True)
    loss, clipped = alg.clipped_surrogate_loss(logp, old, torch.tensor([1.0, -1.0]), clip_low=0.2)
    loss.sum().backward()
    # d(-r A)/d logp = -r A for unclipped tokens: -0.5 * 1 and -1.5 * -1
    close(logp.grad, [[0.0, -0.5], [1.5, 0.0]])
    assert (logp.grad[clipped] == 0).all()


def test_clip_higher_allows_larger_positive_ratio():
    logp, old = _logps_with_ratios([[1.25, 0.5]])
    adv = torch.tensor([[1.0, -1.0]])
    sym, sym_clipped = alg.clipped_surrogate_loss(logp, old, adv, clip_low=0.2)
    higher, higher_clipped = alg.clipped_surrogate_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # r=1.25, A=+1: symmetric caps at 1.2 -> -1.2; clip-higher caps at 1.28 -> -1.25 unclipped
    # r=0.5, A=-1: the lower bound 0.8 is the same in both -> 0.8
    close(sym, [[-1.2, 0.8]])
    close(higher, [[-1.25, 0.8]])
    assert sym_clipped.tolist() == [[True, True]]
    assert higher_clipped.tolist() == [[False, True]]


def test_importance_weights_scale_loss_and_receive_no_gradient():
    logp, old = _logps_with_ratios([[1.0, 1.0]])
    logp.requires_grad_(True)
    weights = torch.tensor([[2.0, 0.5]], requires_grad=True)
    loss, _ = alg.clipped_surrogate_loss(logp, old, torch.tensor([1.0]), 0.2, importance_weights=weights)
    # r=1, A=1: -1 per token, times 2 and 0.5; d/dlogp = -r A w = -w
    close(loss.detach(), [[-2.0, -0.5]])
    loss.sum().backward()
    close(logp.grad, [[-2.0, -0.5]])
    assert weights.grad is None


def test_truncated_importance_weights_cap_ratio_and_are_detached():
    learner = torch.log(torch.tensor([[0.5, 0.9, 0.1]])).requires_grad_(True)
    behaviour = torch.log(torch.tensor([[0.25, 0.9, 0.2]]))
    # ratios 2, 1, 0.5; cap 1.5
    weights = alg.truncated_importance_weights(learner, behaviour, cap=1.5)
    close(weights, [[1.5, 1.0, 0.5]])
    assert not weights.requires_grad


# loss aggregation


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_token_mean_weighs_every_token_equally():
    # (1 + 2 + 3 + 4) / 4
    close(alg.aggregate_loss(PER_TOKEN, MASK, "token_mean"), 2.5)


def test_seq_mean_token_mean_weighs_every_sequence_equally():
    # mean(6 / 3, 4 / 1) = mean(2, 4)
    close(alg.aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_mean"), 3.0)


def test_dr_grpo_constant_normaliser():
    # (1 + 2 + 3 + 4) / (B=2 * max_len=4)
    close(alg.aggregate_loss(PER_TOKEN, MASK, "constant", constant=4), 1.25)
    # every token's gradient weight is 1 / (B * constant), whatever the sequence length
    per_token = PER_TOKEN.clone().requires_grad_(True)
    alg.aggregate_loss(per_token, MASK, "constant", constant=4).backward()
    close(per_token.grad, [[0.125, 0.125, 0.125], [0.125, 0.0, 0.0]])
    with pytest.raises(ValueError, match="max completion length"):
        alg.aggregate_loss(PER_TOKEN, MASK, "constant")
    with pytest.raises(ValueError, match="token_mean"):
        alg.aggregate_loss(PER_TOKEN, MASK, "sum")


def test_padding_tokens_do_not_change_loss():
    torch.manual_seed(0)
    lengths = [3, 5, 1]
    mask = torch.zeros(3, 5)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    logp_valid = torch.randn(3, 5) - 2
    old = logp_valid + 0.1 * torch.randn(3, 5)
    adv = torch.tensor([0.7, -1.3, 2.0])
    junk_a, junk_b = 50 * torch.randn(3, 5), -50 * torch.randn(3, 5)
    valid = mask.bool()
    for mode in ("token_mean", "seq_mean_token_mean", "constant"):
        results = []
        for junk in (junk_a, junk_b):
            logp = torch.where(valid, logp_valid, junk).requires_grad_(True)
            old_logp = torch.where(valid, old, -junk)
            per_token, _ = alg.clipped_surrogate_loss(logp, old_logp, adv, clip_low=0.2)
            loss = alg.aggregate_loss(per_token, mask, mode, constant=5)
            loss.backward()
            results.append((loss.detach(), logp.grad))
        (loss_a, grad_a), (loss_b, grad_b) = results
        close(loss_a, loss_b)
        close(grad_a, grad_b)
        assert (grad_a[~valid] == 0).all()


# PPO pieces


def test_gae_matches_hand_computed_values_and_ignores_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # gamma 0.9, lam 0.5, gamma*lam = 0.45, V after the last valid token = 0
    # t=2: delta = 1 - 0.5 = 0.5;             A = 0.5
    # t=1: delta = 0.9 * 0.5 - 0.5 = -0.05;   A = -0.05 + 0.45 * 0.5 = 0.175
    # t=0: delta = -0.05;                     A = -0.05 + 0.45 * 0.175 = 0.02875
    adv, ret = alg.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[0.02875, 0.175, 0.5, 0.0]])
    close(ret, [[0.52875, 0.675, 1.0, 0.0]])


def test_gae_with_gamma_and_lambda_one_is_return_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]])
    adv, ret = alg.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(ret, [[1.0, 1.0, 1.0]])
    close(adv, [[0.8, 0.6, 0.4]])


def _reference_gae(rewards, values, lengths, gamma, lam):
    adv = torch.zeros_like(values)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


def test_gae_matches_reference_loop():
    torch.manual_seed(1)
    lengths = [6, 1, 4, 0, 3]
    rewards, values = torch.randn(5, 6), torch.randn(5, 6)
    mask = torch.zeros(5, 6)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    adv, ret = alg.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    expected = _reference_gae(rewards, values, lengths, gamma=0.95, lam=0.9)
    close(adv, expected, atol=1e-5)
    close(ret, (expected + values) * mask, atol=1e-5)


def test_gae_gives_same_result_for_left_padding():
    torch.manual_seed(2)
    rewards, values = torch.randn(1, 3), torch.randn(1, 3)
    pad = torch.ones(1, 2)
    right_mask = torch.tensor([[1, 1, 1, 0, 0]])
    right, _ = alg.gae(torch.cat([rewards, pad], 1), torch.cat([values, pad], 1), right_mask, gamma=0.9, lam=0.8)
    left_mask = torch.tensor([[0, 0, 1, 1, 1]])
    left, _ = alg.gae(torch.cat([pad, rewards], 1), torch.cat([pad, values], 1), left_mask, gamma=0.9, lam=0.8)
    close(right[:, :3], left[:, 2:])
    close(right[:, 3:], torch.zeros(1, 2))


def test_eos_rewards_put_score_on_last_valid_token_and_kl_everywhere():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # -0.5 * kl, plus the score at the last valid token (index 2 and 1)
    rewards = alg.eos_rewards_with_kl(scores, kl, mask, kl_coef=0.5)
    close(rewards, [[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]])


def test_eos_rewards_reject_rows_with_no_valid_token():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        alg.eos_rewards_with_kl(torch.zeros(2), torch.zeros(2, 2), torch.tensor([[1, 0], [0, 0]]), kl_coef=0.1)


def test_clipped_value_loss_takes_the_larger_error():
    old = torch.ones(1, 4)
    values = torch.tensor([[1.5, 0.9, 2.5, 1.0]])
    returns = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # 1.5: clipped to 1.2, max(0.25, 0.64) -> 0.32
    # 0.9: inside the clip, (0.9 - 2)^2 = 1.21 -> 0.605
    # 2.5: clipped to 1.2, max(0.25, 0.64) -> 0.32
    close(alg.clipped_value_loss(values, old, returns, mask, clip=0.2), [[0.32, 0.605, 0.32, 0.0]])


def test_entropy_from_logits_matches_closed_forms():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf]]], requires_grad=True)
    # uniform over 4: log 4; uniform over 2 with 2 masked out: log 2
    entropy = alg.entropy_from_logits(logits)
    close(entropy.detach(), [[math.log(4.0), math.log(2.0)]])
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # p = (0.9, 0.1): -(0.9 log 0.9 + 0.1 log 0.1)
    two = torch.log(torch.tensor([[[0.9, 0.1]]]))
    close(alg.entropy_from_logits(two), [[-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]])


def test_explained_variance_over_valid_tokens():
    returns = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert alg.explained_variance(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), returns, mask) == pytest.approx(1.0)
    # constant prediction: residual variance equals return variance
    assert alg.explained_variance(torch.tensor([[2.0, 2.0, 2.0, 0.0]]), returns, mask) == pytest.approx(0.0)
    # residual (0, 0, -1): var 2/9; returns var 2/3 -> 1 - 1/3
    assert alg.explained_variance(torch.tensor([[1.0, 2.0, 4.0, 0.0]]), returns, mask) == pytest.approx(2 / 3)
    assert math.isnan(alg.explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)))


# KL controllers


def test_fixed_kl_controller_never_changes():
    controller = alg.FixedKLController(0.05)
    controller.update(observed_kl=100.0, n_steps=1000)
    assert controller.value == 0.05


def test_adaptive_kl_controller_raises_coef_when_kl_above_target():
    controller = alg.AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    controller.update(observed_kl=6.6, n_steps=256)
    # err = 6.6 / 6 - 1 = 0.1; coef = 0.1 * (1 + 0.1 * 256 / 10000)
    assert controller.value == pytest.approx(0.1 * 1.00256)
    controller.update(observed_kl=60.0, n_steps=256)
    # err clipped to 0.2
    assert controller.value == pytest.approx(0.1 * 1.00256 * 1.00512)


def test_adaptive_kl_controller_lowers_coef_when_kl_below_target():
    controller = alg.AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    controller.update(observed_kl=3.0, n_steps=256)
    # err = -0.5 clipped to -0.2; coef = 0.1 * (1 - 0.2 * 256 / 10000)
    assert controller.value == pytest.approx(0.1 * 0.99488)


def test_phased_kl_controller_follows_schedule():
    controller = alg.PhasedKLController([(0, 0.1), (100, 0.05), (300, 0.0)])
    assert [controller.value_at(s) for s in (0, 99, 100, 299, 300, 10**6)] == [0.1, 0.1, 0.05, 0.05, 0.0, 0.0]
    assert controller.value == 0.1
    controller.update(observed_kl=1.0, n_steps=60)
    controller.update(observed_kl=1.0, n_steps=60)
    # step 120 is in the second phase
    assert controller.value == 0.05


def test_phased_kl_controller_rejects_bad_schedules():
    with pytest.raises(ValueError, match="start at step 0"):
        alg.PhasedKLController([(10, 0.1)])
    with pytest.raises(ValueError, match="increase strictly"):
        alg.PhasedKLController([(0, 0.1), (50, 0.2), (50, 0.3)])


def test_make_kl_controller_builds_each_kind_and_names_missing_fields():
    assert isinstance(alg.make_kl_controller("fixed", coef=0.1), alg.FixedKLController)
    adaptive = alg.make_kl_controller("adaptive", coef=0.2, target=6.0, horizon=1000)
    assert isinstance(adaptive, alg.AdaptiveKLController) and adaptive.value == 0.2
    phased = alg.make_kl_controller("phased", schedule=[(0, 0.3), (10, 0.1)])
    assert phased.value_at(10) == 0.1
    with pytest.raises(ValueError, match="target, horizon"):
        alg.make_kl_controller("adaptive", coef=0.2)
    with pytest.raises(ValueError, match="schedule"):
        alg.make_kl_controller("phased")
    with pytest.raises(ValueError, match="'fixed', 'adaptive' or 'phased'"):
        alg.make_kl_controller("pid", coef=0.1)
