import subprocess
import sys

import pytest

from raylign.common.config import ConfigError, RunConfig, describe_fields, load_config


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_quickstart_config_loads_with_overrides():
    config = load_config("configs/quickstart.yaml", ["train.steps=7", "rollout.backend=hf", "algorithm.kl_coef=0.5"])
    assert config.train.steps == 7
    assert config.rollout.backend == "hf"
    assert config.algorithm.kl_coef == 0.5
    assert config.algorithm.name == "grpo"


def test_unknown_key_names_the_field(tmp_path):
    path = write(tmp_path, "model: {path: 'builtin:tiny-llama'}\ntrain: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key"):
        load_config(path)


def test_wrong_type_names_field_and_value(tmp_path):
    path = write(tmp_path, "model: {path: 'builtin:tiny-llama'}\ntrain: {steps: many}\n")
    with pytest.raises(ConfigError, match=r"train\.steps = 'many'"):
        load_config(path)


def test_grpo_refuses_one_sample_per_prompt():
    with pytest.raises(ConfigError, match=r"rollout\.samples_per_prompt = 1.*at least 2"):
        load_config("configs/quickstart.yaml", ["rollout.samples_per_prompt=1"])


def test_missing_local_model_path_is_refused_but_hub_ids_pass():
    with pytest.raises(ConfigError, match=r"model\.path = './no/such/model' does not exist"):
        load_config("configs/quickstart.yaml", ["model.path=./no/such/model"])
    assert load_config("configs/quickstart.yaml", ["model.path=Qwen/Qwen2.5-0.5B-Instruct"]).model.path == "Qwen/Qwen2.5-0.5B-Instruct"


def test_truncated_sampling_is_accepted_for_rl_and_a_meaningless_top_k_refused():
    assert load_config("configs/quickstart.yaml", ["rollout.top_p=0.9", "rollout.top_k=50"]).rollout.top_p == 0.9
    with pytest.raises(ConfigError, match=r"rollout\.top_k = 0"):
        load_config("configs/quickstart.yaml", ["rollout.top_k=0"])


def test_every_field_has_a_description():
    rows = describe_fields(RunConfig)
    assert len(rows) > 40
    assert [name for name, _, description in rows if not description.strip()] == []


def test_cli_bad_config_exits_nonzero_with_one_message_and_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "raylign", "train", "configs/quickstart.yaml", "rollout.num_workers=0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "rollout.num_workers = 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_lists_config_fields():
    result = subprocess.run([sys.executable, "-m", "raylign", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for field in ["output_dir", "seed", "model.path", "algorithm.name", "rollout.backend", "rollout.num_workers",
                  "rollout.samples_per_prompt", "train.steps"]:
        assert f"  {field}  [default" in result.stdout


def test_rollout_actors_wait_for_the_learner_only_when_both_may_share_one_gpu():
    """Otherwise they start side by side (cluster/driver.py)."""
    from raylign.cluster.driver import may_share_a_gpu

    def shares(*overrides):
        return may_share_a_gpu(load_config("configs/quickstart.yaml", list(overrides)))

    assert not shares()  # CPU
    assert shares("rollout.num_gpus=0.4", "train.num_gpus=0.5")
    assert not shares("rollout.num_gpus=1", "train.num_gpus=1")  # each its own GPU
    assert not shares("rollout.num_gpus=0.5")  # the learner on CPU


def test_threads_follow_the_placement_unless_set():
    from raylign.cluster.placement import run_cores, with_threads

    colocated = with_threads(load_config("configs/quickstart.yaml", ["cluster.num_cpus=6", "rollout.threads=3"]))
    assert (colocated.train.threads, colocated.rollout.threads, colocated.reward.threads) == (6, 3, 6)
    split = with_threads(load_config("configs/quickstart.yaml", ["cluster.placement=split", "train.num_cpus=2"]))
    assert (split.train.threads, split.rollout.threads, split.reward.threads) == (2, 1, 1)
    assert with_threads(load_config("configs/quickstart.yaml")).train.threads == run_cores(load_config("configs/quickstart.yaml"))


def test_actors_wait_passively_when_generation_and_learning_overlap_unless_told_otherwise(monkeypatch):
    from raylign.cluster.placement import actor_env_vars, actor_options

    def env(*overrides):
        return actor_env_vars(load_config("configs/quickstart.yaml", list(overrides)))

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert env() == {} and actor_options({}) == {}  # on-policy: OpenMP's default (spinning is faster there)
    assert env("rollout.max_staleness=1", "algorithm.importance_sampling_cap=2") == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env("cluster.omp_wait_policy=active", "rollout.max_staleness=1", "algorithm.importance_sampling_cap=2") == {
        "OMP_WAIT_POLICY": "ACTIVE"}
    assert env("cluster.omp_wait_policy=passive") == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert actor_options({"OMP_WAIT_POLICY": "PASSIVE"}) == {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own choice, inherited by a local Ray's workers
    assert env("rollout.max_staleness=1", "algorithm.importance_sampling_cap=2") == {}


def test_the_sync_guard_tolerance_follows_the_weights_dtype_unless_set():
    assert load_config("configs/quickstart.yaml").rollout.sync_tolerance == 1e-3
    for dtype in ("bfloat16", "float16"):
        assert load_config("configs/quickstart.yaml", [f"model.dtype={dtype}"]).rollout.sync_tolerance == 1e-2
    chosen = load_config("configs/quickstart.yaml", ["model.dtype=bfloat16", "rollout.sync_tolerance=0.003"])
    assert chosen.rollout.sync_tolerance == 0.003


def test_attention_auto_is_eager_only_on_cpu_in_low_precision():
    import torch

    from raylign.common.precision import attention_kernel

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert attention_kernel("auto", "bfloat16", cpu) == "eager"
    assert attention_kernel("auto", "float16", cpu) == "eager"
    assert attention_kernel("auto", "float32", cpu) == "sdpa"
    assert attention_kernel("auto", "bfloat16", gpu) == "sdpa"
    assert attention_kernel("sdpa", "bfloat16", cpu) == "sdpa"


def test_mixed_precision_sees_weights_changed_in_place_inside_it():
    """An optimizer step, or an older adapter version set for the stale-sample check, happens inside the
    learner's autocast region; the next forward must use the new weights (autocast's cast cache would not)."""
    import torch

    from raylign.common.precision import mixed_precision

    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    with mixed_precision("bfloat16", torch.device("cpu")):
        before = layer(x)
        assert before.dtype == torch.bfloat16
        with torch.no_grad():
            layer.weight.add_(1.0)
        after = layer(x)
    assert not torch.equal(before, after)
    with mixed_precision("float32", torch.device("cpu")):
        assert layer(x).dtype == torch.float32
