"""Configuration of a model evaluation (`raylign evaluate`, and a pipeline's `kind: evaluate` stage).

Every model of an evaluation is sampled on the same held-out prompts with the same sampling settings and
scored by the same reward sources; KL is measured against one named reference model on each model's own
samples. A model is a base model (a hub id, a local directory, `builtin:tiny-<family>`), a model plus a PEFT
LoRA adapter (a DPO stage's artefact on its base), or an RL run: its directory, one of its checkpoints, or a
directory of seed runs (`seed_<s>/`, as `seeds:` writes them), which is evaluated once per seed.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from raylign.common.config import ClusterConfig, DataConfig, RewardConfig, RolloutConfig, Section
from raylign.common.judge_config import JudgeConfig

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class EvalModelConfig(Section):
    name: str = Field(..., description="The model's name: its row in the tables and its samples file, <name>_samples.jsonl.")
    path: str = Field(
        ...,
        description=(
            "What to evaluate: a base model (hub id, local directory, 'builtin:tiny-<family>'), an RL run directory, "
            "one of its checkpoints (checkpoints/step_N or checkpoints/best), a directory of seed runs (seed_<s>/, "
            "evaluated once per seed), or an earlier pipeline stage as '{stage}'."
        ),
    )
    adapter: str | None = Field(
        None, description="A PEFT LoRA adapter directory applied on `path` (a DPO stage's artefact on its base model)."
    )
    checkpoint: Literal["final", "best"] = Field(
        "final",
        description=(
            "For RL runs: the final checkpoint, or the best one by validation reward (checkpoints/best, written "
            "when the run had eval.every set)."
        ),
    )

    @model_validator(mode="after")
    def _checks(self) -> "EvalModelConfig":
        # `path` is checked when the evaluation resolves it (cluster.model_evaluation.resolve_models): in a
        # pipeline it names an artefact that exists only once its stage has run.
        if not MODEL_NAME.match(self.name):
            raise ValueError(f"models[name={self.name!r}]: use letters, digits, '_', '-' and '.' (it names a file)")
        return self


class EvalDataConfig(DataConfig):
    split: str = Field("test", description="Split of data.prompts to evaluate on: the held-out test split.")
    max_prompts: int | None = Field(100, ge=1, description="Evaluate on the first N prompts of the split (null = all).")


class EvalJudgeConfig(JudgeConfig):
    baseline: str = Field(..., description="The model every other model is judged against (a name from `models`).")
    candidates: list[str] | None = Field(None, description="Models to judge against the baseline (null = every other model).")
    max_prompts: int | None = Field(None, ge=1, description="Judge the first N prompts only (null = every evaluation prompt).")


class ScorerConfig(Section):
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for the actor that scores tokens under each model and the reference.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for that actor.")
    threads: int = Field(1, ge=1, description="CPU threads it uses.")
    batch_size: int = Field(16, ge=1, description="Samples per forward pass.")
    shared_prompt_forward: bool = Field(
        True, description="Score each distinct prompt of a forward pass once, its samples on its key/value cache "
                          "(as train.shared_prompt_forward: the same logprobs, faster).")


class EvaluationSpec(Section):
    """What an evaluation compares and how: the fields of `raylign evaluate` and of an evaluate stage."""

    models: list[EvalModelConfig] = Field(..., min_length=1, description="The models to evaluate, in table order.")
    reference: str | None = Field(
        None,
        description=(
            "Name of the model (from `models`) KL is measured against: KL(model || reference) per sequence on each "
            "model's samples, and the reference's perplexity on them. null = no KL."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype of every model.")
    data: EvalDataConfig = Field(default_factory=EvalDataConfig, description="The held-out prompts every model is sampled on.")
    rollout: RolloutConfig = Field(
        default_factory=lambda: RolloutConfig(samples_per_prompt=4),
        description="Engine and sampling settings, the same for every model (samples_per_prompt, max_new_tokens, temperature, ...).",
    )
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward sources every sample is scored by (each reported separately).")
    pass_k: list[int] = Field(default_factory=lambda: [1], description="k values of pass@k; each at most rollout.samples_per_prompt.")
    pass_threshold: float = Field(0.5, description="pass@k counts a prompt as solved when a sample's reward reaches this.")
    seeds: list[int] | None = Field(
        None, description="Seeds of seed-run models to evaluate (null = every seed_<s> they hold); each is its own row of per-seed numbers."
    )
    judge: EvalJudgeConfig | None = Field(
        None, description="LLM judge (an OpenAI-compatible endpoint): win/tie/loss of each model against `judge.baseline`, both orders, 95% interval."
    )
    scorer: ScorerConfig = Field(default_factory=ScorerConfig, description="The actor scoring tokens for KL and the sync check.")
    allow_different: list[str] = Field(
        default_factory=list,
        description=(
            "Config fields the compared RL runs may differ in although they are controlled (e.g. total_samples for "
            "PPO with 1 sample per prompt against GRPO with K); see `raylign report --help`."
        ),
    )
    vary: list[str] = Field(default_factory=list, description="Fields varied on purpose between the seed runs of one model.")

    @model_validator(mode="after")
    def _names_fit(self) -> "EvaluationSpec":
        names = [model.name for model in self.models]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"models: the name {repeated[0]!r} is used twice; give each model its own name")
        choices = ", ".join(names)
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference = {self.reference!r} is not one of the models ({choices}); name one of them, or null for no KL")
        if self.judge is not None:
            for field, name in [("judge.baseline", self.judge.baseline), *(("judge.candidates", c) for c in self.judge.candidates or [])]:
                if name not in names:
                    raise ValueError(f"{field} = {name!r} is not one of the models ({choices})")
        k = self.rollout.samples_per_prompt
        too_big = [value for value in self.pass_k if value < 1 or value > k]
        if too_big:
            raise ValueError(
                f"pass_k = {self.pass_k}: {too_big[0]} needs between 1 and rollout.samples_per_prompt = {k} samples per "
                f"prompt; raise rollout.samples_per_prompt to {max(self.pass_k)} or drop that k"
            )
        return self

    def model(self, name: str) -> EvalModelConfig:
        return next(model for model in self.models if model.name == name)


class EvaluateConfig(EvaluationSpec):
    """`raylign evaluate CONFIG`: an evaluation on its own, writing to output_dir."""

    output_dir: str = Field("outputs/evaluation", description="Where evaluation.json/.md/.tex, the plots and the samples files go.")
    seed: int = Field(0, description="Seed of the sampling noise: each prompt's seed derives from it, the same for every model.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray cluster.")
