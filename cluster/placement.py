"""Where the run's actors go and how many threads each uses.

Every role has its own placement group: the learners one STRICT_PACK group (cluster/learner_group.py), the
rollout workers one with `cluster.rollout_strategy` (PACK or SPREAD), the reward workers one PACK group; so
the same config means the same layout on one node and on many. Threads follow `cluster.placement`.
"""

from __future__ import annotations

import math
import os

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


def bundles(count: int, num_cpus: float, num_gpus: float) -> list[dict]:
    return [{"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus > 0 else {})}] * count


def worker_placement(count: int, num_cpus: float, num_gpus: float, strategy: str):
    """A ready placement group of `count` worker bundles, and the scheduling strategy of bundle i."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group(bundles(count, num_cpus, num_gpus), strategy=strategy)
    ray.get(group.ready())
    return group, lambda index: PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
