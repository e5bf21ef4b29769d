"""A run resumed from a checkpoint reproduces the uninterrupted run."""

import json
import os
import shutil

import pytest

from raylign.cluster.driver import train
from raylign.common.config import load_config


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("grpo", []), ("ppo", []), ("grpo", ["rollout.max_staleness=1", "algorithm.importance_sampling_cap=2.0"]),
], ids=["grpo", "ppo", "grpo-staleness-1"])
def test_resumed_run_reproduces_the_uninterrupted_one(method, extra, warm_model_dir, ray_session, tmp_path):
    common = [f"model.path={warm_model_dir}", "sft.steps=0", "rollout.backend=hf", f"algorithm.name={method}", *extra,
              "train.steps=4", "train.checkpoint_every=2", "train.prompts_per_step=4", "logging.progress=false", "eval.run_test=false",
              "reward.normalize=running", "train.lr_schedule=cosine"]
    whole = tmp_path / "whole"
    train(load_config("configs/quickstart.yaml", [f"output_dir={whole}", *common]))

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    results = train(load_config("configs/quickstart.yaml", [
        f"output_dir={resumed}", *common, f"train.resume_from={resumed / 'checkpoints' / 'step_000002'}",
    ]))

    def metrics(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    expected, got = metrics(whole), metrics(resumed)
    assert [m["step"] for m in got] == [0, 1, 2, 3]
    for before, after in zip(expected, got):
        assert after["reward_mean"] == before["reward_mean"]
        assert after["policy_version"] == before["policy_version"]
        for key in ("loss", "kl", "grad_norm", "learning_rate", "reward/running_mean"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-7), key
    assert results["steps"] == 4
    # With bounded staleness the batch of step t+1 was generated during step t (and carried by the checkpoint).
    assert [m["rollout/staleness"] for m in got] == ([0, 1, 1, 1] if extra else [0, 0, 0, 0])
    if extra:  # generation and learning overlapped: every actor of the run waits passively (cluster.omp_wait_policy)
        import ray

        from raylign.cluster.warm_actors import keeping_actors

        with keeping_actors() as shelf:  # the session's shelf, holding the resumed run's actors
            policies = ray.get([actor.__ray_call__.remote(lambda actor: os.environ.get("OMP_WAIT_POLICY"))
                                for group in shelf.idle for actor in group.actors])
        assert len(policies) == 3 and set(policies) == {os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"}


@pytest.mark.slow
def test_a_dead_learner_is_restarted_from_the_last_checkpoint_and_the_run_ends_as_if_uninterrupted(
        warm_model_dir, ray_session, tmp_path, monkeypatch):
    import ray

    from raylign.cluster.learner_group import LearnerGroup

    common = [f"model.path={warm_model_dir}", "sft.steps=0", "rollout.backend=hf", "train.steps=4",
              "train.checkpoint_every=2", "train.prompts_per_step=4", "logging.progress=false", "eval.run_test=false",
              "reward.normalize=running", "train.max_learner_restarts=1"]
    whole = tmp_path / "whole"
    train(load_config("configs/quickstart.yaml", [f"output_dir={whole}", *common]))

    launches = []
    start_train_step = LearnerGroup.start_train_step

    def start_that_loses_the_learner_in_step_3(self, *args):
        launches.append(1)
        if len(launches) == 4:
            ray.kill(self.leader, no_restart=True)  # an OOM kill or a lost node, as the driver sees it
        return start_train_step(self, *args)

    monkeypatch.setattr(LearnerGroup, "start_train_step", start_that_loses_the_learner_in_step_3)
    crashed = tmp_path / "crashed"
    results = train(load_config("configs/quickstart.yaml", [f"output_dir={crashed}", *common]))

    def metrics(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    expected, got = metrics(whole), metrics(crashed)
    assert len(launches) == 6  # steps 0-3 (3 lost), then 2 and 3 again from the checkpoint taken after step 1
    assert [m["step"] for m in got] == [0, 1, 2, 3] and [m["learner/restarts"] for m in got] == [0, 0, 1, 1]
    for before, after in zip(expected, got):
        assert after["reward_mean"] == before["reward_mean"]
        for key in ("loss", "kl", "grad_norm", "reward/running_mean"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-7), key
    assert results["steps"] == 4


def test_the_newest_complete_checkpoint_is_picked_and_a_half_written_one_never(tmp_path):
    from raylign.cluster.driver import latest_checkpoint

    for name in ("step_000002", "step_000004", ".partial-step_000006", "best"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert latest_checkpoint(tmp_path).name == "step_000004"


def test_resume_without_a_checkpoint_is_one_message_and_exit_status_2(tmp_path, capsys):
    from raylign.cluster.cli import main

    assert main(["train", "--resume", "configs/quickstart.yaml", f"output_dir={tmp_path}"]) == 2
    assert "--resume: no checkpoint under" in capsys.readouterr().err
