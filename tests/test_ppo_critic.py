"""PPO with a separate critic LoRA adapter (seed smollm2_orca): both adapters learn, only the actor is published."""

import torch

from raylign.actors.rollout_worker import RolloutWorker
from raylign.common.config import load_config
from raylign.common.lora import adapter_state_dict
from raylign.common.types import PromptItem, SamplingSettings
from raylign.learner.learner_worker import LearnerWorker


def test_separate_critic_adapter_trains_with_the_actor_and_stays_out_of_the_published_adapter(warm_model_dir):
    config = load_config("configs/quickstart.yaml", [
        f"model.path={warm_model_dir}", "rollout.backend=hf", "algorithm.name=ppo", "algorithm.critic=separate_adapter",
    ])
    learner = LearnerWorker(warm_model_dir, config.model, config.train, config.algorithm, config.rollout, seed=0)
    learner.attach_lora()
    rollout = RolloutWorker("hf", warm_model_dir)
    rollout.load_update(learner.publish())
    before = {name: p.detach().clone() for name, p in learner.model.named_parameters() if "lora_B" in name}
    assert any(".critic." in name for name in before) and any(".default." in name for name in before)

    prompt_ids = learner.tokenizer("Honestly, the movie was").input_ids
    prompts = [PromptItem(index=i, text="", token_ids=prompt_ids, seed=10 + i) for i in range(4)]
    samples = rollout.generate(prompts, SamplingSettings(samples_per_prompt=4, max_new_tokens=12))
    metrics = learner.train_step(samples, [float(i % 3) for i in range(len(samples))])
    assert metrics["rollout/logprob_gap"] < 1e-5 and "value_loss" in metrics
    published = adapter_state_dict(learner.publish().files)
    assert published and not any("critic" in name for name in published)

    # The published adapter is what the actor trained: reloading it reproduces the learner's logprobs.
    rollout.load_update(learner.publish())
    samples = rollout.generate(prompts, SamplingSettings(samples_per_prompt=4, max_new_tokens=12))
    assert learner.train_step(samples, [float(i % 2) for i in range(len(samples))])["rollout/logprob_gap"] < 1e-5
    # The value head starts at zero, so the critic adapter first receives gradient in the second update.
    after = dict(learner.model.named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert any(".critic." in name for name in changed) and any(".default." in name for name in changed)
