"""The reward actors as one group: split a step's samples, join the results, normalise once.

With several actors each scores a contiguous share unnormalised; the first
actor then normalises the joined totals, so there is one set of running
statistics whatever `reward.num_workers` is.
"""

from __future__ import annotations

import ray

from raylign.actors.reward_worker import RewardWorker
from raylign.cluster.console import remote_actor
from raylign.cluster.placement import actor_options, env_identity, worker_placement
from raylign.cluster.ray_setup import wait_for_restart
from raylign.cluster.warm_actors import keep_or_stop, start_or_reuse
from raylign.common.config import RewardConfig
from raylign.common.types import RewardResult, Sample


class RewardPool:
    def __init__(self, config: RewardConfig, log_dir: str | None = None, env_vars: dict[str, str] | None = None):
        """`log_dir`: where the actors write their output (cluster/console.py); None leaves it to Ray.
        `env_vars`: the actors' environment on top of Ray's (cluster/placement.py's `actor_env_vars`)."""
        env_vars = env_vars or {}
        # A crashed actor is restarted by Ray and the batch scored again. The running statistics live
        # here and travel with every call, so a restarted actor starts from the right state. A restarted
        # actor says so in its next result, so `restarts` also counts one killed between calls.
        # Inside keeping_actors() workers of the same count, resources, restarts and environment are handed on
        # between runs.
        self.reuse_key = ("reward", config.num_workers, config.num_cpus, config.num_gpus, config.max_restarts, log_dir is None,
                          env_identity(env_vars))

        def start() -> tuple:
            placement, bundle = worker_placement(config.num_workers, config.num_cpus, config.num_gpus, "PACK")
            actor = remote_actor(RewardWorker, "reward", log_dir)
            return placement, [actor.options(num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                                             max_restarts=config.max_restarts, scheduling_strategy=bundle(rank),
                                             **actor_options(env_vars)).remote(config)
                               for rank in range(config.num_workers)]

        self.placement, self.workers = start_or_reuse(self.reuse_key, start, [(log_dir, (config,), {})] * config.num_workers)
        self.normalizer_state: dict | None = None  # the running statistics as of the last normalised batch
        self.restarts = 0

    def release(self) -> None:
        """Stop the workers and free their placement group, or keep them for the next run inside keeping_actors()."""
        keep_or_stop(self.reuse_key, self.placement, self.workers, restarts=self.restarts)

    def score_batch(self, samples: list[Sample], normalize: bool = True) -> RewardResult:
        """Score a batch; `normalize=False` (evaluation) leaves the running statistics untouched."""
        try:
            result = self._score(samples, normalize)
        except ray.exceptions.RayActorError as error:
            self._recover(error)
            result = self._score(samples, normalize)
        self.restarts += result.restarts
        if normalize:
            self.normalizer_state = result.normalizer_state
        return result

    def _score(self, samples: list[Sample], normalize: bool) -> RewardResult:
        state = self.normalizer_state
        if len(self.workers) == 1:
            return ray.get(self.workers[0].score_batch.remote(samples, normalize=normalize, normalizer_state=state))
        shares = _contiguous_shares(samples, len(self.workers))
        parts = ray.get([w.score_batch.remote(share, normalize=False) for w, share in zip(self.workers, shares) if share])
        joined = RewardResult.concat(parts)
        return ray.get(self.workers[0].normalize.remote(joined, state)) if normalize else joined

    def _recover(self, error: Exception) -> None:
        """Wait until every actor is up again."""
        for worker in self.workers:
            wait_for_restart(worker.normalizer_state.remote, error, "a reward actor", "reward.max_restarts")

    def state_dict(self) -> dict | None:
        """The running normalisation statistics, for checkpoints."""
        return self.normalizer_state

    def load_state_dict(self, state: dict | None) -> None:
        self.normalizer_state = state


def _contiguous_shares(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    bounds = [0]
    for rank in range(parts):
        bounds.append(bounds[-1] + size + (1 if rank < extra else 0))
    return [items[bounds[rank]:bounds[rank + 1]] for rank in range(parts)]
