"""The rollout actors as one group: spread prompts, collect samples in order, broadcast adapters."""

from __future__ import annotations

import time

import ray

from raylign.actors.rollout_worker import RolloutWorker
from raylign.common.config import RunConfig
from raylign.common.types import PromptItem, Sample, SamplingSettings


class RolloutPool:
    def __init__(self, config: RunConfig, model_path: str):
        rollout = config.rollout
        actor = ray.remote(RolloutWorker).options(num_cpus=rollout.num_cpus, num_gpus=rollout.num_gpus)
        self.workers = [
            actor.remote(
                backend=rollout.backend, model_path=model_path, dtype=config.model.dtype, seed=config.seed + rank,
                threads=rollout.threads, lora_rank=config.model.lora.r, kv_cache_gib=rollout.vllm_kv_cache_gib,
                gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
                device="cuda" if rollout.num_gpus > 0 else "cpu",
            )
            for rank in range(rollout.num_workers)
        ]
        self.settings = SamplingSettings(
            samples_per_prompt=rollout.samples_per_prompt, max_new_tokens=rollout.max_new_tokens,
            min_new_tokens=rollout.min_new_tokens, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
        )

    def generate(self, prompts: list[PromptItem]) -> list[Sample]:
        """Contiguous, near-equal shares per worker; samples come back in prompt order.

        Each prompt carries its own seed, so the samples do not depend on how
        many workers there are.
        """
        shares = _split_evenly(prompts, len(self.workers))
        futures = [w.generate.remote(share, self.settings) for w, share in zip(self.workers, shares) if share]
        return [sample for part in ray.get(futures) for sample in part]

    def load_adapter(self, update_ref: ray.ObjectRef) -> float:
        """Every worker loads the same object-store copy; returns seconds until all are ready."""
        start = time.perf_counter()
        ray.get([w.load_adapter.remote(update_ref) for w in self.workers])
        return time.perf_counter() - start


def _split_evenly(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    shares, first = [], 0
    for rank in range(parts):
        last = first + size + (1 if rank < extra else 0)
        shares.append(items[first:last])
        first = last
    return shares
