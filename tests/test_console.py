"""The console shows the progress bar and the run's own messages; the libraries' output goes to output_dir/logs/.
A run that stops for a reason the user can act on ends with that one message; its traceback is in the log."""

from __future__ import annotations

import math
import re
import sys
import warnings

import pytest

from raylign.cluster.cli import main


def noisy_reward(prompts, completions, **_):
    """A reward function that talks the way engines do, on stderr and through `warnings`."""
    print("WARNING 12-01 17:39:49 [noisy.py:1] a library warning on stderr", file=sys.stderr, flush=True)
    warnings.warn("a library FutureWarning", FutureWarning, stacklevel=1)
    return [float(len(c.split())) for c in completions]


def nan_reward(prompts, completions, **_):
    return [math.nan] * len(completions)


def short_run(tmp_path, model_dir, *overrides):
    return ["train", "configs/quickstart.yaml", f"output_dir={tmp_path / 'run'}", f"model.path={model_dir}",
            "sft.steps=0", "rollout.backend=hf", "train.steps=1", "train.prompts_per_step=2",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "eval.every=0", "eval.run_test=false", *overrides]


@pytest.mark.slow
def test_a_short_run_prints_its_progress_and_messages_and_the_logs_hold_the_libraries_output(
        tiny_model_dir, ray_session, tmp_path, capfd):
    assert main(short_run(tmp_path, tiny_model_dir, "reward.function=tests.test_console:noisy_reward")) == 0
    out, err = capfd.readouterr()
    assert out.startswith("done: 1 steps")
    # Only the run's own lines and the progress bar (tqdm redraws it with carriage returns).
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]
    assert lines and all(line.startswith(("[raylign] ", "train:")) for line in lines), lines
    assert "WARNING" not in err and "Generating train split" not in err
    logs = tmp_path / "run" / "logs"
    assert sorted(path.name for path in logs.iterdir()) == ["driver.log", "learner.log", "reward.log", "rollout.log"]
    reward_log = (logs / "reward.log").read_text()
    assert "---- RewardWorker (pid " in reward_log
    assert "a library warning on stderr" in reward_log and "FutureWarning: a library FutureWarning" in reward_log
    assert "---- LearnerWorker (pid " in (logs / "learner.log").read_text()


@pytest.mark.slow
def test_a_run_stopped_by_invalid_rewards_ends_with_one_message_and_leaves_the_traceback_in_the_log(
        tiny_model_dir, ray_session, tmp_path, capfd):
    assert main(short_run(tmp_path, tiny_model_dir, "reward.function=tests.test_console:nan_reward",
                          "logging.progress=false")) == 1
    out, err = capfd.readouterr()
    log = tmp_path / "run" / "logs" / "driver.log"
    engine, message, where = err.splitlines()
    assert engine.startswith("[raylign] rollout engine: hf")
    assert message.startswith("raylign: step 0: 4 of 4 samples have no valid reward; first: sample 0, source "
                              "'nan_reward': returned a non-finite score (nan)")
    assert message.endswith("more than reward.max_invalid_fraction = 0.1. Fix the reward (the errors are in "
                            "reward_errors.jsonl), or raise reward.max_invalid_fraction to tolerate more")
    assert where == f"(the traceback is in {log})" and out == ""
    assert "Traceback (most recent call last)" in log.read_text() and "RewardError: step 0" in log.read_text()


def test_a_weight_sync_failure_ends_the_command_with_its_message_and_status_1(tmp_path, capfd, monkeypatch):
    from raylign.cluster import driver
    from raylign.cluster.console import run_console

    def failing_run(config):
        with run_console(config, tmp_path):
            driver.check_sync({"rollout/logprob_gap": 0.5}, tolerance=1e-3, step=3)

    monkeypatch.setattr(driver, "train_each_seed", failing_run)
    assert main(["train", "configs/quickstart.yaml", f"output_dir={tmp_path}"]) == 1
    out, err = capfd.readouterr()
    assert err.startswith("raylign: step 3: mean |behaviour - learner| logprob gap is 0.5 (> rollout.sync_tolerance = 0.001)")
    assert err.endswith(f"(the traceback is in {tmp_path / 'logs' / 'driver.log'})\n") and "Traceback" not in err
    assert "SyncError: step 3" in (tmp_path / "logs" / "driver.log").read_text()


def test_verbose_leaves_the_actors_output_to_ray(tmp_path):
    from raylign.cluster.console import actor_log_dir
    from raylign.common.config import load_config

    assert actor_log_dir(load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "logging.verbose=true"])) is None
    assert actor_log_dir(load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}"])) == str(tmp_path / "logs")
