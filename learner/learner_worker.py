"""The learner actor: owns the policy (base model + LoRA), runs updates, publishes adapters."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import torch

from raylign.common.config import AlgorithmConfig, ModelConfig, RolloutConfig, SftConfig, TrainConfig
from raylign.common.lora import LiveAdapter, adapter_files, refuse_unmergeable
from raylign.common.precision import DTYPES, attention_kernel, mixed_precision
from raylign.common.types import AdapterUpdate, PromptItem, Sample
from raylign.common.prompt_completion import pad_token_id
from raylign.common.storage import local_copy
from raylign.learner import algorithms as alg
from raylign.learner import update
from raylign.learner.batching import build_token_batch
from raylign.learner.data_parallel import SINGLE, Ranks
from raylign.learner.sft import sft_train
from raylign.learner.update import CRITIC_ADAPTER


def in_mixed_precision(method):
    """Run a LearnerWorker method that scores or trains the policy under the weights' mixed precision
    (common/precision.py: autocast for bfloat16/float16 weights)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with mixed_precision(self.model_config.dtype, self.device):
            return method(self, *args, **kwargs)

    return wrapper


class LearnerWorker:
    """Runs as a Ray actor. The reference policy is the same model with the adapter disabled."""

    # A worker reset for another run (cluster/warm_actors.py) stays a rank of the group it joined.
    KEPT_ON_RESET = ("ranks",)

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

        torch.set_num_threads(train.threads or 1)
        torch.manual_seed(seed)
        random.seed(seed)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() and train.num_gpus > 0 else "cpu"))
        self.model_config, self.train_config, self.algorithm, self.rollout = model, train, algorithm, rollout
        self.seed = seed
        model_path = local_copy(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **self._model_kwargs()).to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.version = -1
        self.ranks = SINGLE

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

    def load_base_model(self, model_path: str) -> None:
        """Replace the base model by the one saved at `model_path` (another rank's warm start)."""
        from transformers import AutoModelForCausalLM

        if self.optimizer is not None:
            raise RuntimeError("the base model can only be replaced before the LoRA adapter is attached")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **self._model_kwargs()).to(self.device)

    def _model_kwargs(self) -> dict:
        """from_pretrained's dtype and attention kernel (model.attn_implementation)."""
        model = self.model_config
        return {"dtype": DTYPES[model.dtype],
                "attn_implementation": attention_kernel(model.attn_implementation, model.dtype, self.device)}

    # ----- policy -----

    def attach_lora(self) -> int:
        from peft import LoraConfig, get_peft_model

        lora = self.model_config.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, task_type="CAUSAL_LM")
        torch.manual_seed(self.seed)
        self.model = get_peft_model(self.model, config)
        if self.rollout.weight_sync == "merged":
            refuse_unmergeable(self.model)  # before step 0, not at the rollout actors' first merge
        # RL runs without dropout: old, reference and current logprobs (the probability ratio, the
        # sync guard) must all come from the same deterministic function. lora.dropout applies to SFT/DPO.
        self.model.eval()
        if self.algorithm.name == "ppo" and self.algorithm.critic == "separate_adapter":
            # The critic gets its own LoRA adapter on the same frozen base (seed smollm2_orca); only
            # the policy adapter ("default") is ever published to the rollout actors.
            self.model.add_adapter(CRITIC_ADAPTER, config)
        hidden_size = self.model.get_input_embeddings().weight.shape[-1]  # a LoRA-wrapped embedding has no embedding_dim
        # PPO's value head reads the last hidden state (zero init: V = 0 at the start).
        self.value_head = torch.nn.Linear(hidden_size, 1).to(self.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.trainable_parameters = [p for n, p in self.model.named_parameters() if "lora_" in n]
        for parameter in self.trainable_parameters:
            parameter.requires_grad_(True)
        if self.algorithm.name == "ppo":
            self.trainable_parameters += list(self.value_head.parameters())
        self.policy = update.ScoringPolicy(
            model=self.model, value_head=self.value_head, trainable_parameters=self.trainable_parameters,
            temperature=self.rollout.temperature, eos_token_id=self.tokenizer.eos_token_id,
            min_new_tokens=self.rollout.min_new_tokens, critic=self.algorithm.critic,
            top_k=self.rollout.top_k, top_p=self.rollout.top_p, share_prompts=self.train_config.shared_prompt_forward,
        )
        train = self.train_config
        self.optimizer = torch.optim.AdamW(self.trainable_parameters, lr=train.learning_rate, weight_decay=train.weight_decay)
        optimizer_steps = train.steps * self.algorithm.epochs * self.algorithm.num_minibatches
        warmup = train.warmup_steps * self.algorithm.epochs * self.algorithm.num_minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, warmup, optimizer_steps, train.lr_schedule)
        )
        algo = self.algorithm
        self.kl_controller = alg.make_kl_controller(
            algo.kl_controller, coef=algo.kl_coef, target=algo.kl_target, horizon=algo.kl_horizon, schedule=algo.kl_schedule
        )
        self.shuffle_rng = torch.Generator().manual_seed(self.seed)
        self.reward_baseline: float | None = None
        self.grad_norm_history: list[float] = []
        self.reward_model = None
        if algo.is_differentiable:
            from raylign.common.reward_models import load_reward_model

            self.reward_model = load_reward_model(algo.reward_model, "classifier").to(self.device)
        self.version = 0
        self.live_adapter = LiveAdapter(self.model)  # the policy adapter's tensors, read and set without PEFT's walk
        self.adapter_history: dict[int, dict[str, torch.Tensor]] = {}
        self._remember_adapter()
        return sum(p.numel() for p in self.trainable_parameters)

    def _remember_adapter(self) -> None:
        """Keep the policy adapter of the current version (and the last rollout.max_staleness before it), so a
        stale sample's behaviour logprobs can be checked under the weights that generated it."""
        if self.rollout.max_staleness == 0:
            return
        self.adapter_history[self.version] = {name: value.detach().to("cpu", copy=True)
                                              for name, value in self.live_adapter.tensors.items()}
        for version in [v for v in self.adapter_history if v < self.version - self.rollout.max_staleness]:
            del self.adapter_history[version]

    @contextlib.contextmanager
    def _adapter_of_version(self, version: int):
        """The policy adapter temporarily set to the weights of `version`."""
        current = {name: value.detach().clone() for name, value in self.live_adapter.tensors.items()}
        self.live_adapter.load(self.adapter_history[version], version)
        try:
            yield
        finally:
            self.live_adapter.load(current, self.version)

    def publish(self) -> AdapterUpdate:
        """The current policy, versioned: the adapter in PEFT's file format (with weight_sync 'merged' the rollout
        actors merge it into their own copy of the base weights)."""
        return AdapterUpdate(version=self.version, files=adapter_files(self.model, self.version, self.live_adapter))

    @in_mixed_precision
    def reference_kl(self, samples: list[Sample], temperature: float = 1.0) -> dict:
        """Per-sequence KL(policy || reference) on samples drawn from the policy, and reference perplexity.

        Uses the k3 estimator summed over tokens, non-negative by construction,
        at the sampling temperature (1.0 for honest evaluation).
        """
        batch = build_token_batch(samples, pad_token_id(self.tokenizer)).to(self.device)
        mask = batch.completion_mask
        with torch.no_grad():
            policy, _ = self.policy.score(batch, temperature=temperature, truncate=False)
            reference = self.policy.reference_score(batch, temperature=temperature)
        kl = alg.masked_sum(alg.kl_per_token(policy.logprobs, reference.logprobs, "k3"), mask, dim=-1)
        reference_nll = -alg.masked_sum(reference.logprobs, mask) / mask.sum().clamp(min=1)
        return {"kl": float(kl.mean()), "kl_std": float(kl.std(unbiased=False)), "reference_perplexity": float(torch.exp(reference_nll))}

    def join_learner_group(self, rank: int, world_size: int, group_name: str) -> int:
        """Become rank `rank` of a data-parallel learner group (every rank calls this before attach_lora)."""
        self.ranks = Ranks.join(rank, world_size, group_name)
        return rank

    @in_mixed_precision
    def train_step(self, samples: list[Sample], rewards: list[float], group_sizes: list[int] | None = None) -> dict:
        """One update of the configured method on a batch of prompt groups (contiguous per prompt).

        `group_sizes` defaults to equal groups of samples_per_prompt; groups are
        smaller when the reward actor marked some samples invalid. In a learner
        group every rank gets the whole batch and works on its own rows; the
        metrics are the whole batch's on every rank.
        """
        if self.optimizer is None:
            raise RuntimeError("attach_lora must be called before train_step")
        algo, ranks, start = self.algorithm, self.ranks, time.perf_counter()
        targets, scores = self._prepare(samples, rewards, group_sizes)
        lengths = torch.tensor([len(s.completion_ids) for s in samples])
        losses, grad_norms = update.run_update(
            self.policy, targets, algo, micro_batch_size=self.train_config.micro_batch_size,
            max_new_tokens=self.rollout.max_new_tokens, optimizer_step=self._optimizer_step, shuffle=self.shuffle_rng,
            completion_lengths=lengths, ranks=ranks,
        )
        sequence_kl = ranks.gather_rows(targets.sequence_kl, targets.rows, len(samples))
        if algo.name == "reinforce":
            # The baseline starts at the first batch's mean (ema_update's first value), not at 0.
            shaped = update.shaped_rewards(targets, scores, algo, ranks)
            self.reward_baseline = alg.ema_update(self.reward_baseline, float(shaped.mean()), algo.baseline_momentum)
        mask = targets.batch.completion_mask
        gap = self._behaviour_gap(samples, targets)
        self.version += 1
        self._remember_adapter()
        self.kl_controller.update(float(sequence_kl.mean()), len(samples) if algo.kl_controller == "adaptive" else 1)
        tokens = float(lengths.sum())

        def token_mean(x: torch.Tensor) -> float:
            return float(ranks.sum(alg.masked_sum(x, mask))) / max(tokens, 1.0)

        metrics = dict(losses)
        metrics.update(self._grad_norm_metrics(grad_norms[-1]))
        metrics.update({
            "entropy": token_mean(targets.entropy),
            "kl_coef": targets.kl_coef,
            "kl_placement": "reward" if algo.kl_in_reward else "loss",
            "rollout/logprob_gap": token_mean(gap),
            "rollout/logprob_gap_max": float(ranks.max((gap * mask).max())),
            "response_length_mean": tokens / len(samples),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "policy_version": self.version,
            "learn_seconds": time.perf_counter() - start,
        })
        if targets.ref_logp is not None:
            metrics["kl_sequence"] = float(sequence_kl.mean())
        if targets.importance is not None:
            metrics["importance_weight_mean"] = token_mean(targets.importance)
        if targets.returns is not None:
            metrics["explained_variance"] = update.explained_variance_across_ranks(
                targets.old_values, targets.returns, mask, ranks)
        return metrics

    def _behaviour_gap(self, samples: list[Sample], targets: update.UpdateTargets) -> torch.Tensor:
        """|learner - behaviour| logprob per token of this rank's rows, each sample scored under the adapter
        version that generated it: the current one (the update's old logprobs) or a kept older one."""
        batch = targets.batch
        gap = (targets.old_logp - batch.behaviour_logprobs).abs()
        versions = torch.tensor([samples[int(i)].policy_version for i in targets.rows])
        for version in sorted(set(versions.tolist()) - {self.version}):
            rows = (versions == version).nonzero().flatten().to(self.device)
            part = batch.select(rows)
            with torch.no_grad(), self._adapter_of_version(version):
                logprobs = self.policy.score(part)[0].logprobs
            gap[rows] = (logprobs - part.behaviour_logprobs).abs()
        return gap

    def _prepare(self, samples: list[Sample], rewards: list[float],
                 group_sizes: list[int] | None, ranks: Ranks | None = None) -> tuple[update.UpdateTargets, torch.Tensor]:
        """This rank's rows' fixed targets (old/reference logprobs, values, advantages) and the batch's scores."""
        ranks = ranks or self.ranks
        group_sizes = group_sizes or [self.rollout.samples_per_prompt] * (len(samples) // self.rollout.samples_per_prompt)
        if sum(group_sizes) != len(samples):
            raise ValueError(f"group sizes {group_sizes} do not add up to the {len(samples)} samples")
        oldest = self.version - self.rollout.max_staleness
        stale = [s.policy_version for s in samples if not oldest <= s.policy_version <= self.version]
        if stale:
            raise RuntimeError(
                f"{len(stale)} samples come from policy version {stale[0]} but the learner is at {self.version} and "
                f"rollout.max_staleness = {self.rollout.max_staleness} accepts versions {oldest}..{self.version}"
            )
        rows = ranks.rows(len(samples))
        batch = build_token_batch([samples[i] for i in rows], pad_token_id(self.tokenizer)).to(self.device)
        scores = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        targets = update.prepare_targets(self.policy, batch, scores, group_sizes, self.algorithm,
                                         kl_coef=self.kl_controller.value, baseline=self.reward_baseline,
                                         rows=rows, ranks=ranks)
        return targets, scores

    @in_mixed_precision
    def gradient_variance(self, batches: list, step: int) -> dict:
        """Gradient noise at the current (fixed) weights from independent batches; no update is made.

        `batches` holds (samples, rewards, group_sizes) for the policy-gradient
        methods, or lists of prompts for GRADE. Returns the trace of the
        gradient covariance, the mean gradient norm and their scale-free ratio.
        """
        from raylign.learner.grade import gradient_variance

        def gradient_of_batch(index: int) -> None:
            if self.algorithm.is_differentiable:
                # Probes draw their own noise (and run on rank 0 alone: the driver asks it only).
                loss = self._grade_loss(batches[index], step, ("probe", self.seed, step, index), SINGLE)[0]
            else:
                samples, rewards, group_sizes = batches[index]
                # Measured on one rank over the whole batch (the driver asks rank 0 only).
                targets, _ = self._prepare(samples, rewards, group_sizes, SINGLE)
                rows = torch.arange(len(samples))
                loss = update.minibatch_loss(self.policy, targets, rows, alg.Normaliser.of(targets.batch.completion_mask),
                                             self.algorithm, self.rollout.max_new_tokens)[0]
            loss.backward()

        result = gradient_variance(gradient_of_batch, len(batches), self.trainable_parameters)
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": step, "method": self.algorithm.name, **result}

    def _grad_norm_metrics(self, grad_norm: float) -> dict:
        self.grad_norm_history.append(grad_norm)
        window = self.grad_norm_history[-self.train_config.grad_norm_window:]
        return {"grad_norm": grad_norm, "grad_norm_mean": statistics.fmean(window), "grad_norm_std": statistics.pstdev(window)}

    @in_mixed_precision
    def grade_step(self, prompts: list[PromptItem], step: int) -> tuple[list[Sample], dict]:
        """One GRADE / GRADE-STE update: relaxed generation, differentiable RM reward, -reward + beta * KL.

        Returns the hard samples the relaxation stands for (decoded text, to be
        scored by the reward actor like every other method's) and the metrics.
        In a learner group every rank relaxes its share of the rows (K per prompt)
        and returns their samples; the loss is normalised over the whole batch, the
        gradients are summed and the metrics are the batch's on every rank.
        """
        from raylign.learner.grade import SHARE_STATS, peak_memory_bytes

        start, ranks = time.perf_counter(), self.ranks
        loss, stats, generation, rows = self._grade_loss(prompts, step, ("train", self.seed, step), ranks)
        loss.backward()
        ranks.sum_gradients(self.trainable_parameters)
        grad_norm = self._optimizer_step()
        totals = ranks.sum(torch.tensor([stats[key] for key in SHARE_STATS] + [float(generation.completion_mask.sum())],
                                        dtype=torch.float64))
        stats.update(zip(SHARE_STATS, totals.tolist()))
        K, batch = self.rollout.samples_per_prompt, len(prompts) * self.rollout.samples_per_prompt
        samples = []
        for index, (row, prompt) in enumerate(rows):
            length = int(generation.completion_mask[index].sum())
            ids = generation.tokens[index, :length].tolist()
            samples.append(Sample(
                prompt_index=prompt.index, sample_index=row % K, prompt=prompt.text, prompt_ids=list(prompt.token_ids),
                completion=self.tokenizer.decode(ids, skip_special_tokens=True), completion_ids=ids,
                behaviour_logprobs=[], policy_version=self.version,
                finish_reason="stop" if self.tokenizer.eos_token_id in ids else "length", extra=dict(prompt.extra),
            ))
        self.version += 1
        # kl_horizon is in samples, as on the policy-gradient path.
        self.kl_controller.update(float(stats["kl_sequence"]), batch if self.algorithm.kl_controller == "adaptive" else 1)
        metrics = {key: float(value) for key, value in stats.items()}
        metrics.update(self._grad_norm_metrics(grad_norm))
        metrics.update({
            "kl_placement": "loss",
            "response_length_mean": float(totals[-1]) / batch,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "peak_memory_bytes": int(ranks.max(torch.tensor(peak_memory_bytes(self.device)))),
            "policy_version": self.version,
            "learn_seconds": time.perf_counter() - start,
        })
        return samples, metrics

    def _grade_loss(self, prompts: list[PromptItem], step: int, noise_key: tuple, ranks: Ranks):
        """Relaxed generation from K copies of each prompt, this rank's rows of them (each row's Gumbel noise
        seeded by `noise_key` and its index in the batch), scored by the classifier RM's soft path over the
        tokens of the hard text (EOS left out). Returns the loss share, stats, the generation and the
        (batch index, prompt) of each row."""
        from raylign.learner.grade import RowNoise, grade_loss, relaxed_generate, tau_at

        algo, K = self.algorithm, self.rollout.samples_per_prompt
        if self.reward_model is None:
            raise RuntimeError("GRADE needs algorithm.reward_model; attach_lora loads it")
        every_row = [p for p in prompts for _ in range(K)]
        indices = ranks.rows(len(every_row)).tolist()
        rows = [every_row[i] for i in indices]
        width = max(len(p.token_ids) for p in rows)
        pad = pad_token_id(self.tokenizer)
        prompt_ids = torch.tensor([[pad] * (width - len(p.token_ids)) + p.token_ids for p in rows], device=self.device)
        prompt_mask = torch.tensor([[0] * (width - len(p.token_ids)) + [1] * len(p.token_ids) for p in rows], device=self.device)
        tau = tau_at(step, algo.tau_start, algo.tau_end, algo.anneal_steps)
        noise = RowNoise(noise_key, indices, self.rollout.max_new_tokens, self.model.get_input_embeddings().weight.shape[0],
                         self.device)
        generation = relaxed_generate(
            self.model, None, prompt_ids, prompt_mask, max_new_tokens=self.rollout.max_new_tokens, tau=tau,
            straight_through=algo.name == "grade_ste", top_k=algo.relaxed_top_k, backprop_window=algo.backprop_window,
            gradient_checkpointing=algo.gradient_checkpointing, eos_token_id=self.tokenizer.eos_token_id,
            min_new_tokens=self.rollout.min_new_tokens, noise=noise,
        )
        token_probs, mask = generation.sequence_for_reward(include_prompt=True, eos_token_id=self.tokenizer.eos_token_id)
        reward = self.reward_model.reward_from_distributions(token_probs, mask)
        normaliser = alg.Normaliser(tokens=float(ranks.sum(generation.completion_mask.sum())), sequences=len(every_row))
        loss, stats = grade_loss(reward, generation.kl, generation.completion_mask, self.kl_controller.value, tau=tau,
                                 aggregation=algo.loss_aggregation, max_new_tokens=self.rollout.max_new_tokens,
                                 normaliser=normaliser)
        return loss, stats, generation, list(zip(indices, rows))

    def _optimizer_step(self) -> float:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters, self.train_config.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save_checkpoint(self, directory: str, driver_state: dict) -> str:
        """Write the checkpoint beside `directory` and rename it into place: a crash mid-write never leaves a
        half-written checkpoint under the name a restart or `--resume` would pick."""
        final = Path(directory)
        path = final.parent / f".partial-{final.name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        self.model.save_pretrained(path / "adapter")
        torch.save({
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "value_head": self.value_head.state_dict(), "version": self.version, "torch_rng": torch.get_rng_state(),
            "shuffle_rng": self.shuffle_rng.get_state(), "kl_controller": vars(self.kl_controller),
            "reward_baseline": self.reward_baseline, "grad_norm_history": self.grad_norm_history,
            "adapter_history": self.adapter_history,
        }, path / "learner_state.pt")
        (path / "driver_state.json").write_text(json.dumps(driver_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(path, final)
        return str(final)

    def load_checkpoint(self, directory: str) -> int:
        """Restore everything `save_checkpoint` wrote (after attach_lora); returns the policy version."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(directory)
        for adapter_dir in [path / "adapter", *(p for p in (path / "adapter").iterdir() if p.is_dir())]:
            name = "default" if adapter_dir == path / "adapter" else adapter_dir.name
            weights = adapter_dir / "adapter_model.safetensors"
            if weights.is_file():
                set_peft_model_state_dict(self.model, load_file(weights), adapter_name=name)
        state = torch.load(path / "learner_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.value_head.load_state_dict(state["value_head"])
        torch.set_rng_state(state["torch_rng"])
        self.shuffle_rng.set_state(state["shuffle_rng"])
        vars(self.kl_controller).update(state["kl_controller"])
        self.reward_baseline, self.grad_norm_history = state["reward_baseline"], state["grad_norm_history"]
        self.adapter_history = state.get("adapter_history", {})
        self.version = state["version"]
        return self.version


def learning_rate_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant, linear or cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
