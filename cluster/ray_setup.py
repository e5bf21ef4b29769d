"""Ray start-up: join a cluster or start a local one, with quiet, thread-limited workers."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

from raylign.common.config import ClusterConfig, RunConfig

WORKER_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "warning",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def requested_cpus(config: RunConfig) -> float:
    return (config.train.num_cpus * config.train.num_learners + config.rollout.num_cpus * config.rollout.num_workers
            + config.reward.num_cpus * config.reward.num_workers)


def job_env_vars() -> dict[str, str]:
    """The `env_vars` of the runtime env given to `ray job submit`, when this driver runs as a Ray job."""
    # Ray's job supervisor passes the job's config to its entrypoint in this variable.
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


def start_ray(config: RunConfig) -> None:
    """Connect to `cluster.address`, or start Ray locally sized to fit every actor of this run."""
    init_ray(config.cluster, requested_cpus(config), config.logging.verbose)


def init_ray(cluster: ClusterConfig, cpus_needed: float, verbose: bool) -> None:
    """Join `cluster.address`, or start a local Ray of its own with at least `cpus_needed` logical CPUs (a run's
    actors, or a pipeline's largest stage); nothing when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    if cluster.address is not None:
        # Inside `ray job submit`, Ray merges this runtime env into the job's and refuses a variable set in both;
        # the user's value wins.
        job_env = job_env_vars()
        worker_env = {key: value for key, value in WORKER_ENV.items() if key not in job_env}
        ray.init(address=cluster.address, runtime_env={"env_vars": worker_env}, log_to_driver=verbose)
        return
    # Logical CPUs only schedule actors; on a small machine they time-share the real cores.
    num_cpus = max(cluster.num_cpus or os.cpu_count() or 1, math.ceil(cpus_needed))
    # Unless verbose, each actor writes its output to its run's or stage's logs/ (cluster/console.py), not the console.
    # address="local": a new instance even when RAY_ADDRESS or a `ray start` head on this machine is there, which
    # ray.init() would join (and then refuse num_cpus).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV},
             log_to_driver=verbose)


RESTART_TIMEOUT_S = 600


def wait_for_restart(ping: Callable[[], object], error: Exception, what: str, max_restarts_field: str) -> None:
    """After an actor crashed: wait until Ray has restarted it and `ping()` (which should also restore
    the actor's state) succeeds. Raises naming the cause when the actor is gone for good."""
    import ray

    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        try:
            ray.get(ping())
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} crashed ({error}) and was not back within {RESTART_TIMEOUT_S} s") from None
            time.sleep(1.0)
        except ray.exceptions.RayActorError as final:
            raise RuntimeError(
                f"{what} died and could not be restarted ({error}); {max_restarts_field} limits restarts per "
                "actor: raise it, or find why the actor dies (memory?) in the Ray logs"
            ) from final
