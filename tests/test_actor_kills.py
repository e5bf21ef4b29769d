"""SIGKILL of an actor's OS process (rollout, reward or learner) in the middle of a 60-step run (the rollout
actor at step 20 and the reward actor at step 40 of one run; the learner at step 30 of another): the run
completes with steps 0..59 each trained once, and each restart is counted in metrics.jsonl. A learner killed
after the last step (in the final checkpoint, then in the test evaluation) is restarted too, in a 3-step run."""

import functools
import json
import os
import signal
import time

import pytest

from raylign.cluster.driver import train
from raylign.cluster.evaluation import Evaluator
from raylign.cluster.learner_group import LearnerGroup
from raylign.cluster.reward_pool import RewardPool
from raylign.cluster.rollout_pool import RolloutPool
from raylign.common.config import load_config

STEPS = 60
KILL_STEP = 30  # the kill comes in the call that serves this step
# Kills after the last step: 3 steps, checkpoints of step 0's state, after step 1 and the final one, then the
# test evaluation on 2 prompts x 2 samples.
SHORT_STEPS = 3
SHORT_RUN = (f"train.steps={SHORT_STEPS}", "train.checkpoint_every=2", "eval.run_test=true", "eval.test_samples=2",
             "eval.samples_per_prompt=2")


def run(model_dir, output_dir, *overrides):
    """The 60-step run; `overrides` (later ones win) change it."""
    return train(load_config("configs/quickstart.yaml", [
        f"model.path={model_dir}", f"output_dir={output_dir}", "sft.steps=0", "rollout.backend=hf",
        f"train.steps={STEPS}", "train.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=4", "eval.every=0", "eval.run_test=false", "logging.progress=false",
        "logging.samples_per_step=0", "reward.normalize=running", "train.checkpoint_every=10",
        "train.max_learner_restarts=1", *overrides,
    ]))


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def pid_of(actor):
    import ray

    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))


def sigkill_at_call(monkeypatch, cls, method, actor_of, when, call=KILL_STEP):
    """In call `call` (counting from 0) of cls.method, SIGKILL the process of `actor_of(self)`: 'before' the
    call, 'after' it returned (start_train_step returns with the update on its way to the learner), or at the
    call's first ray.wait ('at_wait': the rollout pool waits right after handing out its work)."""
    import ray

    original, wait = getattr(cls, method), ray.wait
    calls = []

    def patched(self, *args, **kwargs):
        calls.append(1)
        if len(calls) != call + 1:
            return original(self, *args, **kwargs)
        kill = functools.partial(os.kill, pid_of(actor_of(self)), signal.SIGKILL)  # asked before the call queues
        if when == "before":
            kill()
        elif when == "at_wait":
            def kill_then_wait(*wait_args, **wait_kwargs):
                monkeypatch.setattr(ray, "wait", wait)
                kill()
                return wait(*wait_args, **wait_kwargs)

            monkeypatch.setattr(ray, "wait", kill_then_wait)
        result = original(self, *args, **kwargs)
        if when == "after":
            kill()
        return result

    monkeypatch.setattr(cls, method, patched)
    return calls


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, ray_session, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run(tiny_model_dir, output_dir)
    return metrics(output_dir)


def assert_every_step_trained_once(got, steps=STEPS):
    assert [m["step"] for m in got] == list(range(steps))
    # One optimizer step per training step: the learner's version counts them, and every batch was sampled
    # from the adapter published just before it (a rollout that lost its adapter would show here or trip the
    # sync guard).
    assert [m["policy_version"] for m in got] == list(range(1, steps + 1))
    assert all(m["rollout/staleness"] == 0 for m in got)


def restarts_from(got, key, steps=STEPS):
    """The step from which `key` reads 1, checking it read 0 before and 1 after."""
    values = [m[key] for m in got]
    first = values.index(1)
    assert values == [0] * first + [1] * (steps - first), key
    return first


ROLLOUT_KILL_STEP, REWARD_KILL_STEP = 20, 40  # one run, each kill in the middle of its own stretch


@pytest.mark.slow
def test_a_sigkilled_rollout_actor_and_later_a_sigkilled_reward_actor_are_restarted_and_the_run_ends_as_if_uninterrupted(
        tiny_model_dir, ray_session, uninterrupted, tmp_path, monkeypatch):
    # The rollout actor killed while it generates step 20's samples; the reward actor just before step 40's
    # batch reaches it.
    sigkill_at_call(monkeypatch, RolloutPool, "generate", lambda pool: pool.workers[0], "at_wait", ROLLOUT_KILL_STEP)
    sigkill_at_call(monkeypatch, RewardPool, "score_batch", lambda pool: pool.workers[0], "before", REWARD_KILL_STEP)
    results = run(tiny_model_dir, tmp_path)
    got = metrics(tmp_path)
    assert results["steps"] == STEPS
    assert_every_step_trained_once(got)
    assert restarts_from(got, "rollout/restarts") == ROLLOUT_KILL_STEP
    assert restarts_from(got, "reward/restarts") == REWARD_KILL_STEP
    assert all(m["learner/restarts"] == 0 for m in got)
    # The lost work was redone with the same adapter, seeds and reward statistics: the same numbers.
    for before, after in zip(uninterrupted, got, strict=True):
        assert after["reward_mean"] == before["reward_mean"]
        for key in ("loss", "kl", "grad_norm", "reward/running_mean"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-7), key


@pytest.mark.slow
def test_a_sigkilled_learner_is_restarted_from_its_checkpoint_and_no_step_is_trained_twice(
        tiny_model_dir, ray_session, tmp_path, monkeypatch):
    # Killed once step 30's update is on its way to it.
    launches = sigkill_at_call(monkeypatch, LearnerGroup, "start_train_step", lambda group: group.leader, "after")
    results = run(tiny_model_dir, tmp_path)
    got = metrics(tmp_path)
    assert results["steps"] == STEPS
    assert_every_step_trained_once(got)
    # Steps 30.. are redone from the checkpoint written after step 29 (checkpoint_every=10).
    assert len(launches) == STEPS + 1
    assert restarts_from(got, "learner/restarts") == KILL_STEP
    assert all(m["rollout/restarts"] == 0 and m["reward/restarts"] == 0 for m in got)


def count_calls(monkeypatch, cls, method):
    original, calls = getattr(cls, method), []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, counted)
    return calls


@pytest.mark.slow
def test_a_learner_killed_in_the_final_checkpoint_and_again_in_the_test_evaluation_is_restarted_each_time(
        tiny_model_dir, ray_session, tmp_path, monkeypatch):
    """One run, two kills after the last step: the learner just before the final checkpoint (the third save)
    reaches it, so the replacement starts from the checkpoint after step 1 and redoes step 2; then that
    replacement as the test evaluation starts generating (its KL pass on the learner fails), after it wrote
    the final checkpoint, so the next one starts from that and retrains nothing."""
    saves = sigkill_at_call(monkeypatch, LearnerGroup, "save_checkpoint", lambda group: group.leader, "before", call=2)
    evaluations = sigkill_at_call(monkeypatch, Evaluator, "_evaluate", lambda evaluator: evaluator.learner, "before",
                                  call=0)
    launches = count_calls(monkeypatch, LearnerGroup, "start_train_step")
    results = run(tiny_model_dir, tmp_path, *SHORT_RUN, "train.max_learner_restarts=2")
    got = metrics(tmp_path)
    assert results["steps"] == SHORT_STEPS
    assert_every_step_trained_once(got, SHORT_STEPS)
    assert restarts_from(got, "learner/restarts", SHORT_STEPS) == 2  # step 2, logged after the first restart
    assert len(launches) == SHORT_STEPS + 1  # step 2 twice, nothing after the second restart
    assert len(saves) == 5  # step 0's state, after step 1, then the final checkpoint once per learner group
    assert len(evaluations) == 2
    assert results["learner/restarts"] == 2
    assert results["rollout/restarts"] == results["reward/restarts"] == 0
    # The test evaluation that finished used the final adapter and alone wrote its samples.
    assert results["final_checkpoint"] == str(tmp_path / "checkpoints" / f"step_{SHORT_STEPS:06d}")
    assert results["test/prompts"] == 2 and results["test/adapter"] == "last" and results["test/invalid_count"] == 0
    assert results["test/kl"] >= 0 and "test/reward_mean" in results
    assert len((tmp_path / "test_samples.jsonl").read_text().splitlines()) == 2 * 2


def sigkill_and_wait_for_its_restart(actor):
    import ray

    old = pid_of(actor)
    os.kill(old, signal.SIGKILL)
    while True:
        try:
            if pid_of(actor) != old:
                return
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.2)


@pytest.mark.slow
def test_an_actor_killed_between_calls_and_back_before_the_next_gets_its_state_and_is_counted(tiny_model_dir,
                                                                                              ray_session):
    """No call fails here, so only the restarted actor itself can tell: a rollout actor holds no policy, a reward
    actor reports that Ray restarted it."""
    import ray
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylign.actors.reward_worker import RewardWorker
    from raylign.common.lora import adapter_files
    from raylign.common.types import AdapterUpdate, PromptItem

    config = load_config("configs/quickstart.yaml", [f"model.path={tiny_model_dir}", "rollout.backend=hf",
                                                      "rollout.max_new_tokens=4", "reward.normalize=running"])
    rollouts, rewards = RolloutPool(config, tiny_model_dir), RewardPool(config.reward)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        items = [PromptItem(index=i, text=text, token_ids=tokenizer(text).input_ids, seed=i)
                 for i, text in enumerate(["The movie was", "Overall, the plot"])]
        policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        update = ray.put(AdapterUpdate(version=3, files=adapter_files(policy, 3)))
        rollouts.publish(update)
        expected = rollouts.generate(items)
        first = rewards.score_batch(expected)

        sigkill_and_wait_for_its_restart(rollouts.workers[0])  # after a publish: generate finds no policy
        again = rollouts.generate(items)
        assert rollouts.restarts == 1
        sigkill_and_wait_for_its_restart(rollouts.workers[0])  # before a publish: the load finds nothing to replace
        rollouts.publish(update)
        assert rollouts.restarts == 2
        assert [(s.completion_ids, s.policy_version) for s in rollouts.generate(items)] == \
            [(s.completion_ids, s.policy_version) for s in again] == [(s.completion_ids, 3) for s in expected]

        sigkill_and_wait_for_its_restart(rewards.workers[0])
        second = rewards.score_batch(expected)
        assert rewards.restarts == 1
        steady = RewardWorker(config.reward).score_batch(expected, normalizer_state=first.normalizer_state)
        assert second.rewards == steady.rewards  # normalised with the statistics from before the kill
    finally:
        rollouts.release()
        rewards.release()
