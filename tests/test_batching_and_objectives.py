import math

import pytest
import torch

from raylign.common.types import Sample
from raylign.learner.batching import build_token_batch, score_tokens
from raylign.learner.update import policy_objective, sequence_advantages


def sample(prompt_ids, completion_ids, logprobs):
    return Sample(prompt_index=0, sample_index=0, prompt="", prompt_ids=prompt_ids, completion="",
                  completion_ids=completion_ids, behaviour_logprobs=logprobs, policy_version=0, finish_reason="stop")


def test_token_batch_aligns_completion_positions_with_next_token_targets():
    batch = build_token_batch([sample([1, 5], [7, 8, 2], [-0.1, -0.2, -0.3]), sample([1, 4, 4], [9], [-0.5])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 7, 8, 2], [1, 4, 4, 9, 0]]
    # Column j scores token j+1: completion tokens sit at targets 2..4 and 3.
    assert batch.completion_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]
    assert batch.completion_index.tolist() == [[-1, 0, 1, 2], [-1, -1, 0, -1]]
    assert torch.allclose(batch.behaviour_logprobs, torch.tensor([[0, -0.1, -0.2, -0.3], [0, 0, -0.5, 0]]))


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same table at every position."""

    def __init__(self, logits):
        super().__init__()
        self.table = torch.tensor(logits)

    def forward(self, input_ids, attention_mask, output_hidden_states=False):
        out = self.table.expand(input_ids.shape[0], input_ids.shape[1], -1)
        return type("Output", (), {"logits": out})()


def test_token_logprobs_apply_temperature_and_min_token_eos_mask():
    model = FixedLogits([0.0, math.log(3.0), 0.0])  # probs 1/5, 3/5, 1/5 at T=1
    batch = build_token_batch([sample([0], [1, 2], [0.0, 0.0])], pad_token_id=0)
    logp = score_tokens(model, batch).logprobs
    assert torch.allclose(logp[0], torch.log(torch.tensor([3 / 5, 1 / 5])), atol=1e-6)
    # T=2 halves the logits: weights 1, sqrt(3), 1.
    logp = score_tokens(model, batch, temperature=2.0).logprobs
    z = 2 + math.sqrt(3)
    assert torch.allclose(logp[0], torch.log(torch.tensor([math.sqrt(3) / z, 1 / z])), atol=1e-6)
    # EOS (id 2) masked for the first completion token only: token 1 then has prob 3/4.
    logp = score_tokens(model, batch, eos_token_id=2, min_new_tokens=1).logprobs
    assert torch.allclose(logp[0], torch.log(torch.tensor([3 / 4, 1 / 5])), atol=1e-6)


def test_grpo_loss_on_policy_equals_minus_advantage_plus_kl():
    # On-policy (logp == old_logp) the ratio is 1, so the surrogate is -A per token.
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    ref_logp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.5]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = policy_objective(logp, logp.detach(), ref_logp, advantages, mask, clip_low=0.2, clip_high=None,
                                   kl_coef_in_loss=0.1, kl_estimator="k3", aggregation="token_mean", max_new_tokens=2)
    # k3 = r - log r - 1 with r = ref/pi: token (0,1): r=2 -> 1 - ln2; token (1,0): r=0.5 -> ln2 - 0.5; others 0.
    kl_tokens = [0.0, 1 - math.log(2), math.log(2) - 0.5]
    expected_kl = sum(kl_tokens) / 3
    assert math.isclose(stats["kl"].item(), expected_kl, rel_tol=1e-5)
    assert math.isclose(stats["policy_loss"].item(), (-1 - 1 + 1) / 3, rel_tol=1e-6)
    assert math.isclose(loss.item(), (-1 - 1 + 1) / 3 + 0.1 * expected_kl, rel_tol=1e-5)
    assert stats["clip_fraction"].item() == 0.0


def test_sequence_advantages_for_each_method():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    # GRPO, mean-only: group means 2 and 0.
    assert sequence_advantages("grpo", scores, 2, advantage_scale="none").tolist() == [-1.0, 1.0, 0.0, 0.0]
    # RLOO: r_i - mean of the others: 1-3, 3-1, 0-0, 0-0.
    assert sequence_advantages("rloo", scores, 2).tolist() == [-2.0, 2.0, 0.0, 0.0]
    # REINFORCE: r - baseline.
    assert sequence_advantages("reinforce", scores, 2, baseline=0.5).tolist() == [0.5, 2.5, -0.5, -0.5]


def test_truncation_keeps_top_k_ties_and_the_smallest_top_p_set_renormalised():
    from raylign.learner.batching import truncate_logits

    # probs 0.5, 0.25, 0.125, 0.125: top_p 0.7 keeps the two most likely (ascending cumsum 0.125, 0.25 <= 0.3).
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    kept = torch.log_softmax(truncate_logits(logits, top_p=0.7), -1).exp()
    torch.testing.assert_close(kept, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]), atol=1e-6, rtol=0)
    # top_k 3 keeps both tokens tied with the 3rd largest logit.
    assert torch.isfinite(truncate_logits(logits, top_k=3)).tolist() == [[True, True, True, True]]
    assert torch.isfinite(truncate_logits(logits, top_k=1)).tolist() == [[True, False, False, False]]
    # A token named in `keep` survives even when the rule drops it.
    assert torch.isfinite(truncate_logits(logits, top_k=1, keep=torch.tensor([2])))[0, 2]


@pytest.mark.parametrize("top_k,top_p", [(-1, 0.9), (20, 1.0), (20, 0.8), (5, 0.95)])
def test_truncation_matches_vllms_sampler_rule(top_k, top_p):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from raylign.learner.batching import truncate_logits

    logits = 3 * torch.randn(16, 512, generator=torch.Generator().manual_seed(top_k + int(100 * top_p)))
    theirs = apply_top_k_top_p_pytorch(logits.clone(), torch.full((16,), top_k) if top_k > 0 else None,
                                       torch.full((16,), top_p) if top_p < 1 else None)
    ours = truncate_logits(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    torch.testing.assert_close(torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1))


def test_truncated_logprobs_apply_at_completion_positions_only():
    batch = build_token_batch([sample([0, 1], [1, 2], [0.0, 0.0])], pad_token_id=0)
    model = FixedLogits([math.log(0.5), math.log(0.3), math.log(0.2)])
    full = score_tokens(model, batch).logprobs
    truncated = score_tokens(model, batch, top_p=0.6).logprobs
    # The prompt position (target 1) keeps the full distribution; completion targets are renormalised over the
    # kept set {0, 1}, and target 2 is outside it but was sampled, so it is kept too.
    torch.testing.assert_close(truncated[0, 0], full[0, 0])
    torch.testing.assert_close(truncated[0, 1], torch.log(torch.tensor(0.3 / 0.8)))
    torch.testing.assert_close(truncated[0, 2], torch.log(torch.tensor(0.2 / 1.0)))
