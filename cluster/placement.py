"""Where the run's actors go and how many threads each uses.

Every role has its own placement group: the learners one STRICT_PACK group (`start_ranks`: a run's learner
group in cluster/learner_group.py, an offline pipeline stage's trainers in cluster/pipeline.py), the
rollout workers one with `cluster.rollout_strategy` (PACK or SPREAD), the reward workers one PACK group; so
the same config means the same layout on one node and on many. Threads follow `cluster.placement`.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Hashable

from raylign.cluster.warm_actors import keep_or_stop, start_or_reuse
from raylign.common.config import RunConfig


def run_cores(config: RunConfig) -> int:
    """The cores the run was given: cluster.num_cpus, else this node's."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return config.cluster.num_cpus or available


def with_threads(config: RunConfig) -> RunConfig:
    """The config with every unset `threads` decided: under 'colocate' the phases take turns, so each gets all
    the run's cores; under 'split' each actor uses what it reserved."""
    def threads(section) -> int:
        if section.threads is not None:
            return section.threads
        if config.cluster.placement == "colocate":
            return run_cores(config)
        return max(1, math.floor(section.num_cpus))

    return config.model_copy(update={
        "train": config.train.model_copy(update={"threads": threads(config.train)}),
        "rollout": config.rollout.model_copy(update={"threads": threads(config.rollout)}),
        "reward": config.reward.model_copy(update={"threads": threads(config.reward)}),
    })


def actor_env_vars(config: RunConfig) -> dict[str, str]:
    """Environment variables every actor of the run starts with (on top of Ray's job environment): OpenMP's
    waiting policy, which the process reads once, when torch loads OpenMP (`cluster.omp_wait_policy`)."""
    policy = config.cluster.omp_wait_policy
    if policy == "auto":
        if config.rollout.max_staleness == 0 or "OMP_WAIT_POLICY" in os.environ:
            return {}
        policy = "passive"
    return {"OMP_WAIT_POLICY": policy.upper()}


def env_identity(env_vars: dict[str, str]) -> tuple:
    """`env_vars` as part of a kept group's reuse key: an actor's environment is fixed when its process starts."""
    return tuple(sorted(env_vars.items()))


def actor_options(env_vars: dict[str, str]) -> dict:
    """The `.options(...)` that start an actor with `env_vars` (none when empty: Ray's job environment)."""
    return {"runtime_env": {"env_vars": env_vars}} if env_vars else {}


def bundles(count: int, num_cpus: float, num_gpus: float) -> list[dict]:
    return [{"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus > 0 else {})}] * count


def worker_placement(count: int, num_cpus: float, num_gpus: float, strategy: str):
    """A ready placement group of `count` worker bundles, and the scheduling strategy of bundle i."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raylign.cluster.warm_actors import reserve

    group = placement_group(bundles(count, num_cpus, num_gpus), strategy=strategy)
    reserve(group)
    return group, lambda index: PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)


def start_ranks(actor, count: int, num_cpus: float, num_gpus: float, *args, log_dir: str | None = None,
                reuse_key: Hashable | None = None, env_vars: dict[str, str] | None = None) -> tuple:
    """`count` actors of the remote class `actor`, built from `args`, in one STRICT_PACK placement group and
    joined as one data-parallel group (each has `join_learner_group(rank, world_size, group_name)`): the
    placement group, and the actors in rank order. Nothing is left reserved when a rank fails to start.
    With `reuse_key`, a group of that shape kept from an earlier run is reset to `args` instead
    (cluster/warm_actors.py; its ranks stay joined); `log_dir` is where the actors write their output;
    `env_vars` their environment (`actor_env_vars`; part of `reuse_key`)."""
    import ray

    def start() -> tuple:
        group, bundle = worker_placement(count, num_cpus, num_gpus, "STRICT_PACK")
        actors = [actor.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=bundle(rank),
                                **actor_options(env_vars or {})).remote(*args)
                  for rank in range(count)]
        try:
            if count > 1:
                name = f"raylign-learners-{uuid.uuid4().hex[:12]}"
                ray.get([a.join_learner_group.remote(rank, count, name) for rank, a in enumerate(actors)])
        except BaseException:
            release_ranks(group, actors)
            raise
        return group, actors

    if reuse_key is None:
        return start()
    return start_or_reuse(reuse_key, start, [(log_dir, args, {})] * count)


def release_ranks(group, actors: list, reuse_key: Hashable | None = None) -> None:
    """Stop the actors and free their placement group, or keep them for the next run of shape `reuse_key`."""
    keep_or_stop(reuse_key, group, actors)


def first_failure_or_all(refs: list) -> list:
    """Every result of refs from the ranks of one group; the first failure is raised as soon as it happens,
    since the other ranks would wait for the failed one in their next collective forever."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)
