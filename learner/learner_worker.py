"""The learner actor: owns the policy (base model + LoRA), runs updates, publishes adapters."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from raylign.common.config import AlgorithmConfig, ModelConfig, RolloutConfig, SftConfig, TrainConfig
from raylign.common.lora import adapter_files
from raylign.common.types import AdapterUpdate, Sample
from raylign.learner import algorithms as alg
from raylign.learner.batching import build_token_batch, token_logprobs
from raylign.learner.grpo import grpo_loss
from raylign.learner.sft import sft_train

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LearnerWorker:
    """Runs as a Ray actor. The reference policy is the same model with the adapter disabled."""

    def __init__(
        self,
        model_path: str,
        model: ModelConfig,
        train: TrainConfig,
        algorithm: AlgorithmConfig,
        rollout: RolloutConfig,
        seed: int,
        device: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(train.threads)
        torch.manual_seed(seed)
        random.seed(seed)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() and train.num_gpus > 0 else "cpu"))
        self.model_config, self.train_config, self.algorithm, self.rollout = model, train, algorithm, rollout
        self.seed = seed
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[model.dtype]).to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.version = -1

    # ----- SFT warm start (full parameters, before the adapter exists) -----

    def sft(self, texts: list[str], config: SftConfig, output_dir: str) -> dict:
        """Fine-tune all weights on `texts` and save the result as the new base model."""
        if self.optimizer is not None:
            raise RuntimeError("SFT must run before the LoRA adapter is attached")
        start = time.perf_counter()
        losses = sft_train(
            self.model, self.tokenizer, texts, steps=config.steps, batch_size=config.batch_size,
            learning_rate=config.learning_rate, max_length=config.max_length, seed=self.seed,
        )
        self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
        return {"sft_loss_first": losses[0], "sft_loss_last": losses[-1], "sft_seconds": time.perf_counter() - start}

    # ----- policy -----

    def attach_lora(self) -> int:
        from peft import LoraConfig, get_peft_model

        lora = self.model_config.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, task_type="CAUSAL_LM")
        torch.manual_seed(self.seed)
        self.model = get_peft_model(self.model, config)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.train_config.learning_rate, weight_decay=self.train_config.weight_decay)
        self.version = 0
        return sum(p.numel() for p in trainable)

    def publish(self) -> AdapterUpdate:
        """The current adapter, versioned, in PEFT's file format."""
        return AdapterUpdate(version=self.version, files=adapter_files(self.model, self.version))

    def _logprobs(self, batch, with_entropy: bool = False):
        return token_logprobs(
            self.model, batch, temperature=self.rollout.temperature, eos_token_id=self.tokenizer.eos_token_id,
            min_new_tokens=self.rollout.min_new_tokens, with_entropy=with_entropy,
        )

    def train_step(self, samples: list[Sample], rewards: list[float]) -> dict:
        """One GRPO update on a batch of K-sample groups (contiguous per prompt)."""
        if self.optimizer is None:
            raise RuntimeError("attach_lora must be called before train_step")
        stale = [s.policy_version for s in samples if s.policy_version != self.version]
        if stale:
            raise RuntimeError(
                f"{len(stale)} samples come from policy version {stale[0]} but the learner is at {self.version}; "
                "on-policy training needs every sample from the current version"
            )
        algo, K = self.algorithm, self.rollout.samples_per_prompt
        start = time.perf_counter()
        batch = build_token_batch(samples, self.tokenizer.pad_token_id).to(self.device)
        mask = batch.completion_mask
        rewards_tensor = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        advantages = alg.group_advantages(rewards_tensor, K, scale=algo.advantage_scale)

        with torch.no_grad():
            old_logp, entropy = self._logprobs(batch, with_entropy=True)
            with self.model.disable_adapter():
                ref_logp, _ = self._logprobs(batch)
        gap = (old_logp - batch.behaviour_logprobs).abs()
        stats_sum: dict[str, float] = {}
        micro = self.train_config.micro_batch_size
        num_micro = 0
        grad_norms = []
        for _ in range(algo.num_iterations):
            for first in range(0, len(samples), micro):
                rows = slice(first, first + micro)
                part = batch.select(rows)
                logp, _ = self._logprobs(part)
                loss, stats = grpo_loss(
                    logp, old_logp[rows], ref_logp[rows], advantages[rows], part.completion_mask,
                    clip_low=algo.clip_low, clip_high=algo.clip_high, kl_coef=algo.kl_coef,
                    kl_estimator=algo.kl_estimator, aggregation=algo.loss_aggregation,
                    max_new_tokens=self.rollout.max_new_tokens,
                )
                # Micro-batches are weighted by their share of the samples.
                (loss * (logp.shape[0] / len(samples))).backward()
                for key, value in {"loss": loss.detach(), **stats}.items():
                    stats_sum[key] = stats_sum.get(key, 0.0) + float(value)
                num_micro += 1
            parameters = [p for p in self.model.parameters() if p.requires_grad]
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(parameters, self.train_config.max_grad_norm)))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        metrics = {key: value / num_micro for key, value in stats_sum.items()}
        metrics.update({
            "grad_norm": grad_norms[-1],
            "entropy": float(alg.masked_mean(entropy, mask)),
            "rollout/logprob_gap": float(alg.masked_mean(gap, mask)),
            "rollout/logprob_gap_max": float((gap * mask).max()),
            "response_length_mean": float(mask.sum(-1).mean()),
            "kl_coef": algo.kl_coef,
            "policy_version": self.version,
            "learn_seconds": time.perf_counter() - start,
        })
        return metrics

    def save_checkpoint(self, directory: str, driver_state: dict) -> str:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path / "adapter")
        torch.save({"optimizer": self.optimizer.state_dict(), "version": self.version,
                    "torch_rng": torch.get_rng_state()}, path / "learner_state.pt")
        (path / "driver_state.json").write_text(json.dumps(driver_state, indent=2))
        return str(path)
