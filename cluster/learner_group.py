"""The learner actors of a run: `train.num_learners` data-parallel ranks in one STRICT_PACK placement group.

Rank 0 speaks for the group (publishes the adapter, writes checkpoints, runs GRADE and measurements);
every rank takes part in each update (see learner/data_parallel.py for why the result equals one learner's).
"""

from __future__ import annotations

import ray

from raylign.cluster.console import actor_log_dir, remote_actor
from raylign.cluster.placement import actor_env_vars, env_identity, release_ranks, start_ranks
from raylign.common.config import RunConfig
from raylign.learner.learner_worker import LearnerWorker


class LearnerGroup:
    def __init__(self, config: RunConfig, model_path: str):
        train, log_dir, env_vars = config.train, actor_log_dir(config), actor_env_vars(config)
        # Learners of the same count, resources and environment are handed on between runs inside keeping_actors().
        self.reuse_key = ("learner", train.num_learners, train.num_cpus, train.num_gpus, log_dir is None,
                          env_identity(env_vars))
        self.placement, self.actors = start_ranks(
            remote_actor(LearnerWorker, "learner", log_dir), train.num_learners, train.num_cpus,
            train.num_gpus, model_path, config.model, train, config.algorithm, config.rollout, config.seed,
            log_dir=log_dir, reuse_key=self.reuse_key, env_vars=env_vars)

    @property
    def leader(self):
        """Rank 0's actor handle."""
        return self.actors[0]

    def alive(self) -> bool:
        """Whether every rank still answers."""
        try:
            ray.get([actor.__ray_ready__.remote() for actor in self.actors], timeout=60)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def release(self) -> None:
        """Stop the ranks and free their placement group, or keep them for the next run inside keeping_actors()
        (once; later calls do nothing). A group with a dead rank is never kept."""
        if self.placement is None:
            return
        release_ranks(self.placement, self.actors, self.reuse_key)
        self.placement = None

    def warm_start(self, texts: list[str], sft_config, output_dir: str) -> dict:
        """Full-parameter SFT on rank 0; the other ranks then load its result as their base model."""
        metrics = ray.get(self.leader.sft.remote(texts, sft_config, output_dir))
        ray.get([actor.load_base_model.remote(output_dir) for actor in self.actors[1:]])
        return metrics

    def attach_lora(self) -> int:
        return ray.get([actor.attach_lora.remote() for actor in self.actors])[0]

    def publish(self):
        """An ObjectRef to rank 0's adapter update (one copy in the object store)."""
        return self.leader.publish.remote()

    def start_train_step(self, samples, rewards: list[float], group_sizes: list[int]) -> list:
        """Launch one update on every rank; `finish` waits for it. A group puts the batch in the object store
        once for all its ranks; a lone learner gets it in the call itself (a small batch travels inline)."""
        batch = ray.put(samples) if len(self.actors) > 1 else samples
        return [actor.train_step.remote(batch, rewards, group_sizes) for actor in self.actors]

    def finish(self, pending: list) -> dict:
        return ray.get(pending)[0]

    def train_step(self, samples, rewards: list[float], group_sizes: list[int]) -> dict:
        return self.finish(self.start_train_step(samples, rewards, group_sizes))

    def grade_step(self, prompts, step: int) -> tuple[list, dict]:
        """One GRADE update on every rank: the samples of all ranks (in batch order) and rank 0's metrics."""
        results = ray.get([actor.grade_step.remote(prompts, step) for actor in self.actors])
        return [sample for samples, _ in results for sample in samples], results[0][1]

    def save_checkpoint(self, directory: str, driver_state: dict) -> str:
        return ray.get(self.leader.save_checkpoint.remote(directory, driver_state))

    def load_checkpoint(self, directory: str) -> int:
        return ray.get([actor.load_checkpoint.remote(directory) for actor in self.actors])[0]
