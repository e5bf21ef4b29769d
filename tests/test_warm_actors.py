"""Actors kept between runs (cluster/warm_actors.py): a kept actor is reset to the next run's arguments, comes
back as that actor when Ray restarts it, and a seed run on kept actors trains exactly as on fresh ones."""

import json
import os
import re
import signal
import time

import pytest

from raylign.common.config import load_config


@pytest.mark.slow
def test_a_kept_actor_is_reset_to_the_next_runs_arguments_and_a_restart_brings_back_those(ray_session):
    import ray

    from raylign.cluster.console import remote_actor
    from raylign.cluster.placement import worker_placement
    from raylign.cluster.warm_actors import keep_or_stop, keeping_actors, start_or_reuse

    class Holder:
        def __init__(self, value: str):
            self.value = value

        def read(self) -> tuple[str, int]:
            return self.value, os.getpid()

    actor_class = remote_actor(Holder, "holder", None)

    def start(value: str):
        def create():
            placement, bundle = worker_placement(1, 0.1, 0, "PACK")
            return placement, [actor_class.options(num_cpus=0.1, max_restarts=1, scheduling_strategy=bundle(0)).remote(value)]
        return create

    with keeping_actors(own=True) as shelf:
        placement, (first,) = start_or_reuse(("holder",), start("a"), [(None, ("a",), {})])
        value, pid = ray.get(first.read.remote())
        keep_or_stop(("holder",), placement, [first])
        placement, (again,) = start_or_reuse(("holder",), start("b"), [(None, ("b",), {})])
        assert ray.get(again.read.remote()) == ("b", pid) and shelf.reused == 1
        other_placement, (other,) = start_or_reuse(("other",), start("c"), [(None, ("c",), {})])
        assert ray.get(other.read.remote())[1] != pid  # another shape is never handed on
        keep_or_stop(("other",), other_placement, [other])

        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            try:
                value, new_pid = ray.get(again.read.remote())
                break
            except ray.exceptions.ActorUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert (value, new_pid != pid) == ("b", True)  # reconstructed as it was reset, not as it was created
        keep_or_stop(("holder",), placement, [again])
    for handle in (again, other):  # the block's end stops what it kept
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.read.remote(), timeout=30)


def actor_pids(run_dir) -> dict[str, list[int]]:
    """Per role, the pid each start or reset wrote at the head of logs/<role>.log (cluster/console.py)."""
    return {role: [int(pid) for pid in re.findall(r"\(pid (\d+)\) started", (run_dir / "logs" / f"{role}.log").read_text())]
            for role in ("learner", "rollout", "reward")}


def training_metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.mark.slow
def test_a_seed_on_the_actors_of_the_previous_seed_trains_exactly_as_on_fresh_actors(warm_model_dir, ray_session, tmp_path):
    from raylign.cluster.driver import train, train_each_seed
    from raylign.cluster.warm_actors import keeping_actors

    overrides = [f"model.path={warm_model_dir}", "sft.steps=0", "rollout.backend=vllm", "train.steps=3",
                 "train.prompts_per_step=4", "eval.every=0", "eval.run_test=false", "logging.progress=false"]
    with keeping_actors(own=True):  # seed 1 starts its own actors and hands them to seed 2
        train_each_seed(load_config("configs/quickstart.yaml", [*overrides, f"output_dir={tmp_path / 'kept'}", "seeds=[1, 2]"]))
    with keeping_actors(own=True):  # nothing to take: fresh actors
        train(load_config("configs/quickstart.yaml", [*overrides, f"output_dir={tmp_path / 'fresh'}", "seed=2"]))

    first, second, fresh = (actor_pids(tmp_path / run) for run in ("kept/seed_1", "kept/seed_2", "fresh"))
    for role in first:
        assert second[role] == first[role]  # seed 2 ran in the processes seed 1 started (its vLLM engine kept)
        assert fresh[role] != first[role]
    kept = training_metrics(tmp_path / "kept" / "seed_2")
    assert kept == training_metrics(tmp_path / "fresh")
    assert len(kept) == 3 and max(row["rollout/logprob_gap"] for row in kept) < 1e-4


@pytest.mark.slow
def test_a_reset_vllm_worker_keeps_its_engine_for_the_same_model_and_builds_a_fresh_ones_twin_for_another(twin_dirs):
    """In one process (as in a kept actor): the same engine arguments keep the engine, another model gets an
    engine that samples exactly what a fresh worker's does."""
    from raylign.actors.rollout_worker import RolloutWorker
    from raylign.common.model_checks import load_tokenizer
    from raylign.common.types import PromptItem, SamplingSettings

    settings = SamplingSettings(samples_per_prompt=2, max_new_tokens=6, temperature=1.0)

    def sample(worker, model_dir):
        ids = load_tokenizer(model_dir)("I watched this last night and the movie was")["input_ids"]
        worker.use_base_model()
        return [(s.completion_ids, s.behaviour_logprobs) for s in worker.generate([PromptItem(0, "", ids, seed=3)], settings)]

    llama, qwen = twin_dirs["llama"], twin_dirs["qwen2"]
    worker = RolloutWorker("vllm", llama, max_model_len=64)
    engine = worker.engine
    worker.reset_in_place(backend="vllm", model_path=llama, max_model_len=64, seed=7)
    assert worker.engine is engine and worker.policy_version is None
    worker.reset_in_place(backend="vllm", model_path=qwen, max_model_len=64)
    assert worker.engine is not engine
    rebuilt = sample(worker, qwen)
    del worker, engine
    assert rebuilt == sample(RolloutWorker("vllm", qwen, max_model_len=64), qwen)


@pytest.mark.slow
def test_a_reset_vllm_worker_that_loaded_merged_weights_keeps_its_engine_with_the_models_own_weights(twin_dirs):
    """Merged weights overwrite a vLLM engine's weights in place; a reset for another run on the same model keeps
    the engine and reloads the model's own weights from its files: the base model samples as before, and the
    kept merger merges the next run's adapter into the model's own weights."""
    from raylign.actors.rollout_worker import RolloutWorker
    from raylign.common.lora import adapter_files
    from raylign.common.model_checks import load_tokenizer
    from raylign.common.types import AdapterUpdate, PromptItem, SamplingSettings
    from tests.test_vllm_rollout import random_adapter

    llama = twin_dirs["llama"]
    ids = load_tokenizer(llama)("I watched this last night and the movie was")["input_ids"]
    settings = SamplingSettings(samples_per_prompt=2, max_new_tokens=6, temperature=1.0)

    def sample(worker):
        return [(s.completion_ids, s.behaviour_logprobs) for s in worker.generate([PromptItem(0, "", ids, seed=3)], settings)]

    arguments = {"backend": "vllm", "model_path": llama, "max_model_len": 64, "weight_sync": "merged"}
    worker = RolloutWorker(**arguments)
    worker.use_base_model()
    base = sample(worker)
    adapter = AdapterUpdate(version=1, files=adapter_files(random_adapter(llama, seed=1), 1))
    worker.load_update(adapter)
    merged = sample(worker)
    assert merged != base
    engine = worker.engine
    worker.reset_in_place(**arguments)
    assert worker.engine is engine and not worker.merged_names
    worker.use_base_model()
    assert sample(worker) == base
    # The next run's adapter goes through the merger the worker kept (its base copy is still the model's own).
    worker.reset_in_place(**arguments)
    worker.load_update(adapter)
    assert sample(worker) == merged


@pytest.mark.parametrize("num_gpus, asked, eager", [(0, None, True), (1, None, False), (1, True, True), (0, False, False)])
def test_vllm_runs_eagerly_on_cpu_and_captures_cuda_graphs_on_a_gpu_unless_told_and_it_names_the_engine(
        num_gpus, asked, eager):
    from raylign.actors.rollout_worker import engine_identity
    from raylign.cluster.rollout_pool import worker_arguments
    from raylign.common.engine_support import engine_plan

    overrides = [f"rollout.num_gpus={num_gpus}"] + ([] if asked is None else [f"rollout.vllm_enforce_eager={str(asked).lower()}"])
    config = load_config("configs/quickstart.yaml", overrides)
    plan = engine_plan("vllm", "lora", "LlamaForCausalLM")
    arguments = worker_arguments(config, plan, "builtin:tiny-llama", 2, 64)
    assert [a["enforce_eager"] for a in arguments] == [eager, eager] and [a["seed"] for a in arguments] == [0, 1]
    # A kept worker keeps its engine only for the same enforce_eager (cluster/warm_actors.py).
    other = engine_identity({**arguments[0], "enforce_eager": not eager})
    assert engine_identity(arguments[0]) != other
