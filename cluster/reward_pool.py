"""The reward actors as one group: split a step's samples, join the results, normalise once.

With several actors each scores a contiguous share unnormalised; the first
actor then normalises the joined totals, so there is one set of running
statistics whatever `reward.num_workers` is.
"""

from __future__ import annotations

import ray

from raylign.actors.reward_worker import RewardWorker
from raylign.common.config import RewardConfig
from raylign.common.types import RewardResult, Sample


class RewardPool:
    def __init__(self, config: RewardConfig):
        actor = ray.remote(RewardWorker).options(num_cpus=config.num_cpus, num_gpus=config.num_gpus)
        self.workers = [actor.remote(config) for _ in range(config.num_workers)]

    def score_batch(self, samples: list[Sample], normalize: bool = True) -> RewardResult:
        """Score a batch; `normalize=False` (evaluation) leaves the running statistics untouched."""
        if len(self.workers) == 1:
            return ray.get(self.workers[0].score_batch.remote(samples, normalize=normalize))
        shares = _contiguous_shares(samples, len(self.workers))
        parts = ray.get([w.score_batch.remote(share, normalize=False) for w, share in zip(self.workers, shares) if share])
        joined = RewardResult.concat(parts)
        return ray.get(self.workers[0].normalize.remote(joined)) if normalize else joined

    def state_dict(self) -> dict | None:
        """The running normalisation statistics, for checkpoints."""
        return ray.get(self.workers[0].normalizer_state.remote())

    def load_state_dict(self, state: dict | None) -> None:
        ray.get(self.workers[0].load_normalizer_state.remote(state))


def _contiguous_shares(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    bounds = [0]
    for rank in range(parts):
        bounds.append(bounds[-1] + size + (1 if rank < extra else 0))
    return [items[bounds[rank]:bounds[rank + 1]] for rank in range(parts)]
