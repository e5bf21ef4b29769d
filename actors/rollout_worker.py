"""The rollout actor: a thin shell that owns one engine and tags samples with a policy version."""

from __future__ import annotations

import gc
import inspect
import os
from pathlib import Path

from raylign.common.types import AdapterUpdate, PromptItem, Sample, SamplingSettings


class NoPolicyError(RuntimeError):
    """`generate` on an actor that holds no policy: never published to, or restarted by Ray since."""


class RolloutWorker:
    """Runs as a Ray actor (the driver wraps it with `ray.remote`); usable directly in tests."""

    def __init__(
        self,
        backend: str,
        model_path: str,
        dtype: str = "float32",
        seed: int = 0,
        threads: int = 1,
        lora_rank: int = 8,
        kv_cache_gib: int = 1,
        gpu_memory_utilization: float = 0.4,
        enforce_eager: bool = True,
        device: str = "cpu",
        weight_sync: str = "lora",
        keep_versions: int = 1,
        max_model_len: int = 256,
        hf_max_batch_rows: int = 64,
        attn_implementation: str = "auto",
    ):
        """`backend` and `weight_sync` as decided at start-up (`common.engine_support`); `max_model_len` is the
        context the vLLM engine reserves (prompt budget + max_new_tokens)."""
        # What the engine is built from (the parameters, read before any is changed below): a reset keeps it
        # only for the same (`reset_in_place`).
        self.engine_identity = engine_identity({name: value for name, value in locals().items() if name in ENGINE_ARGUMENTS})
        # vLLM reads these at import time; the engine runs in this process so
        # Ray's CPU accounting is the real one.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from raylign.common.model_checks import load_tokenizer
        from raylign.common.storage import local_copy

        torch_threads(threads)
        model_path = local_copy(model_path)
        self.tokenizer = load_tokenizer(model_path)
        if backend == "vllm":
            from raylign.actors.engines import VLLMEngine

            self.engine = VLLMEngine(model_path, max_model_len=max_model_len, dtype=dtype, seed=seed,
                                     max_lora_rank=lora_rank, gpu_memory_utilization=gpu_memory_utilization,
                                     keep_versions=keep_versions, enable_lora=weight_sync == "lora",
                                     enforce_eager=enforce_eager)
        elif backend == "hf":
            from raylign.actors.engines import HFEngine

            self.engine = HFEngine(model_path, dtype=dtype, device=device, max_batch_rows=hf_max_batch_rows,
                                   attn_implementation=attn_implementation)
        else:
            raise ValueError(f"rollout.backend = '{backend}' is not supported; use 'vllm' or 'hf'")
        self.policy_version: int | None = None
        # weight_sync 'merged': every published adapter is merged here, into this actor's copy of the base model.
        self.merger = None
        if weight_sync == "merged":
            from raylign.common.lora import AdapterMerger
            from raylign.common.precision import DTYPES

            self.merger = AdapterMerger(model_path, DTYPES[dtype])
        # What the last merged weights named: the engine's weights there are not the model's own.
        self.merged_names: set[str] = set()

    def reset_in_place(self, **arguments) -> None:
        """Become `RolloutWorker(**arguments)` in this process (cluster/warm_actors.py). A vLLM engine built from
        the same arguments and model files is kept with its adapters dropped (starting one is the expensive
        part); the engine's own seed and threads may differ, and no sample depends on the seed: every request
        carries its prompt's seed; if merged weights replaced some of its weights, the model's own are reloaded
        from its files. Otherwise the engine is built again in this process, which saves importing
        vLLM again (on CPU; on a GPU the rollout pool only hands a worker on to runs of the same engine,
        `RolloutPool.reuse_key`). A transformers engine is always loaded again."""
        from raylign.actors.engines import VLLMEngine

        bound = inspect.signature(RolloutWorker.__init__).bind(self, **arguments)
        bound.apply_defaults()
        if isinstance(self.engine, VLLMEngine) and engine_identity(bound.arguments) == self.engine_identity:
            torch_threads(bound.arguments["threads"])
            self.engine.drop_adapters()
            if self.merged_names:
                self.engine.restore_base_weights()
                self.merged_names = set()
            self.policy_version = None
            return
        engine = self.engine
        self.__dict__.clear()
        if isinstance(engine, VLLMEngine):
            engine.close()
        del engine
        gc.collect()
        RolloutWorker.__init__(self, **arguments)

    def load_update(self, update: AdapterUpdate) -> int | None:
        """Install a published policy version: the adapter itself (weight_sync 'lora'), or the base weights with
        the adapter merged in ('merged'); returns the version held before, None in a fresh process (so the pool
        sees that Ray restarted this actor since its last publish)."""
        if self.merger is not None:
            weights = self.merger.merged_weights(update)
            names = set(weights)
            if not self.merged_names <= names:
                # An earlier update merged layers this one does not name (another adapter's layout, as when an
                # evaluation scores several models on one engine): they go back to the model's own first.
                self.engine.restore_base_weights()
            self.engine.load_merged_weights(weights, update.version)
            self.merged_names = names
        else:
            self.engine.load_adapter(update)
        previous, self.policy_version = self.policy_version, update.version
        return previous

    def use_base_model(self, version: int = 0) -> None:
        """Sample from the model as loaded, without an adapter (evaluating a base or SFT model itself)."""
        if self.policy_version is not None:
            raise RuntimeError(
                f"use_base_model after policy version {self.policy_version} was loaded: the engine would keep that "
                "adapter; sample the base model from a fresh rollout actor"
            )
        self.policy_version = version

    def generate(self, prompts: list[PromptItem], settings: SamplingSettings) -> list[Sample]:
        if self.policy_version is None:
            raise NoPolicyError("generate called before any adapter was loaded; the driver must publish version 0 first")
        samples = []
        for prompt, completions in zip(prompts, self.engine.generate(prompts, settings), strict=True):
            for sample_index, completion in enumerate(completions):
                samples.append(Sample(
                    prompt_index=prompt.index,
                    sample_index=sample_index,
                    prompt=prompt.text,
                    prompt_ids=list(prompt.token_ids),
                    completion=self.tokenizer.decode(completion.token_ids, skip_special_tokens=True),
                    completion_ids=completion.token_ids,
                    behaviour_logprobs=completion.logprobs,
                    policy_version=self.policy_version,
                    finish_reason=completion.finish_reason,
                    extra=dict(prompt.extra),
                ))
        return samples


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# The arguments an engine is built from; the seed and threads are not among them (see reset_in_place).
ENGINE_ARGUMENTS = ("backend", "model_path", "dtype", "lora_rank", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager", "device",
                    "weight_sync", "keep_versions", "max_model_len", "hf_max_batch_rows", "attn_implementation")


def engine_identity(arguments: dict) -> tuple:
    """What an engine built from `arguments` is: those of ENGINE_ARGUMENTS, and when the model's files last
    changed (an engine kept from before new weights were saved at the same path must not serve them)."""
    return tuple((name, arguments.get(name)) for name in ENGINE_ARGUMENTS) + (weights_stamp(arguments["model_path"]),)


def weights_stamp(model_path: str) -> float | None:
    """The newest file time of a local model directory; None for a hub name or a storage URI (not opened here:
    the rollout pool computes a GPU worker's key on the driver, which must not download the model for it)."""
    directory = Path(model_path)
    if not directory.is_dir():
        return None
    return max((f.stat().st_mtime for f in directory.iterdir() if f.is_file()), default=None)
