"""Pipeline configuration: named stages run in order, each stage's artefact feeding later ones by path.

```yaml
output_dir: outputs/pipelines/gpt2_hh_rlhf
stages:
  - {name: sft, kind: sft, model: {path: gpt2}, data: {source: Anthropic/hh-rlhf}}
  - {name: rm, kind: reward_model, type: scalar, model: {path: gpt2}, data: {source: Anthropic/hh-rlhf}}
  - name: ppo
    kind: train
    run: {model: {path: "{sft}"}, reward: {sources: [{name: scalar_rm, path: "{rm}"}]}, algorithm: {name: ppo}}
```

A path field (`path`, `source`, `prompts`, `data`, `adapter`, `reward_model`, at any depth of a stage) may name
an earlier stage as `"{stage_name}"`, alone or as the start of a path (`"{rm}/prompts.jsonl"`); it is replaced
by that stage's artefact before the stage runs. Quote it in YAML: unquoted, `{sft}` reads as a mapping (which
is accepted and turned back into the reference, so a forgotten pair of quotes is harmless).

Artefacts: `sft` → the fine-tuned model directory (LoRA merged; the adapter alone in `adapter/`);
`reward_model` → a reward-model directory `load_reward_model` reads; `dpo` → the LoRA adapter directory;
`train` → the final checkpoint directory (its LoRA adapter is in `adapter/`), or, run at several seeds, the stage
directory holding one run per seed (`seed_<s>/`); `evaluate` and `report` → their directory (evaluation.md,
report.md and the rest).

Storage: with `storage` set (a directory every node sees, or a pyarrow.fs URI), a reference names the stage's
artefact there (`"{sft}"` → `s3://bucket/run/sft`), and whatever opens it (model, tokenizer and reward-model
loading, data files) reads a node-local copy (`common.storage.local_copy`).

Seeds: a train stage runs once per seed of its `run.seeds`, else of the pipeline's `seeds`, else once at `seed`.
Offline stages run once (at `seed`), so every seed's RL run starts from the same SFT model and scores with the
same reward model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from raylign.common.builtin_preferences import BUILTIN_DATASETS
from raylign.common.config import (
    BUILTIN_MODEL_PREFIX,
    ClusterConfig,
    ConfigError,
    LoraConfig,
    RunConfig,
    Section,
    apply_overrides,
    check_model_path,
    describe_fields,
    format_validation_error,
    read_yaml_mapping,
)
from raylign.common.evaluate_config import EvaluateConfig, EvaluationSpec
from raylign.common.model_checks import check_has_tokenizer
from raylign.common.preference_data import resolve_format
from raylign.common.storage import check_location, is_uri, local_directory

STAGE_KINDS = ("sft", "reward_model", "dpo", "train", "evaluate", "report")
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
REFERENCE = re.compile(r"\{([^{}]*)\}")
PATH_KEYS = frozenset({"path", "source", "prompts", "data", "adapter", "reward_model"})
# Stands in for an artefact that does not exist yet, so a `train` stage can be validated before the pipeline
# runs; it looks like a hub id, which RunConfig's existence checks let through.
PLACEHOLDER_PREFIX = "pipeline-stage/"


# ----- sections of an offline stage -----


class StageModelConfig(Section):
    path: str = Field(
        ...,
        description=(
            "Base model: a local directory, a hub id (org/name), 'builtin:tiny-<family>' (a tiny offline twin of "
            "llama, gpt2, pythia, gemma, smollm2, qwen2 or qwen3), or an earlier stage's artefact as '{stage_name}'."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype while training.")
    lora: LoraConfig | None = Field(
        None,
        description=(
            "LoRA adapter to train ({r, alpha, dropout, target_modules}); null trains every parameter. "
            "Required for DPO (its reference is the model with the adapter disabled)."
        ),
    )
    quantization: Literal["4bit"] | None = Field(
        None, description="'4bit' loads the base in NF4 via bitsandbytes (QLoRA; needs lora and a CUDA GPU)."
    )
    chat_template: bool | None = Field(
        None, description="Render prompts with the tokenizer's chat template: null = when it has one, true = required, false = never."
    )


class StageDataConfig(Section):
    source: str = Field(
        ...,
        description=(
            "Training data: 'builtin:movie-reviews' (SFT), 'builtin:movie-preferences' (chosen/rejected), "
            "'builtin:movie-sentiment' (text + label), a hub id (Anthropic/hh-rlhf, HuggingFaceH4/ultrafeedback_binarized, "
            "Intel/orca_dpo_pairs, imdb) or a local .jsonl/.json/.parquet/.csv file."
        ),
    )
    format: str = Field(
        "auto", description="Row schema: auto (from the hub id or the file's columns), imdb, hh-rlhf, ultrafeedback, orca or jsonl."
    )
    split: str | None = Field(
        None, description="The source's split (hub), or the value of a local file's `split` column; null = the format's default."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="jsonl format: source column per schema field, e.g. {prompt: tweet, chosen: reply}."
    )
    max_rows: int | None = Field(None, ge=1, description="Use only the first N rows of the source (before splitting).")
    fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.9, "eval": 0.1},
        description=(
            "Named disjoint splits as shares of the rows, assigned by a hash of the prompt (a prompt never lands in "
            "two splits), e.g. {rm: 0.2, policy: 0.4, val: 0.08}. Shares may sum to less than 1."
        ),
    )
    test_split: str | None = Field(
        "auto",
        description=(
            "The held-out test split, kept apart from every split of `fractions` (a prompt in it is dropped from "
            "them) and written to prompts.jsonl as split 'test' for evaluate stages and eval.run_test: 'auto' = "
            "the source's own (IMDB 'test', HH-RLHF 'test', UltraFeedback 'test_prefs'), else a deterministic "
            "hold-out of `test_fraction` of the prompts (Orca, built-in data, local files); a name = that split of "
            "the source (a local file's `split` column); null = no test split."
        ),
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the prompts held out as the test split when the source has no test split of its own."
    )
    max_test_rows: int | None = Field(None, ge=1, description="Read at most this many rows of the source's test split.")
    train_split: str = Field("train", description="The split of `fractions` this stage trains on.")
    eval_split: str | None = Field("eval", description="The split of `fractions` it validates on (null = no validation).")
    max_eval_rows: int | None = Field(500, ge=1, description="Validate on at most this many rows of eval_split.")


class OfflineTrainingConfig(Section):
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Examples (pairs, for RM and DPO) per step.")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate, decayed linearly to 0 over `steps`.")
    max_length: int = Field(512, ge=8, description="Truncate prompt + completion to this many tokens.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip (grad_norm is logged before clipping).")
    eval_every: int = Field(0, ge=0, description="Validate every N steps (0 = only after the last step).")


class ResourcesConfig(Section):
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each of the stage's actors.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for each of the stage's actors; training runs on the GPU when > 0.")
    threads: int = Field(1, ge=1, description="CPU threads torch uses in each actor.")
    num_learners: int = Field(
        1, ge=1,
        description=(
            "Data-parallel trainer actors (ranks), each with num_cpus, num_gpus and threads, in one STRICT_PACK "
            "placement group: each rank scores and differentiates its share of every batch, the gradients are summed "
            "and every rank takes the same step, so N ranks train what one would; rank 0 writes the artefact. "
            "training.batch_size must be at least num_learners."
        ),
    )


# ----- stages -----


class _OfflineStage(Section):
    name: str = Field(..., description="Stage name: its directory under output_dir and how later stages refer to it.")
    model: StageModelConfig = Field(..., description="The model to train.")
    data: StageDataConfig = Field(..., description="Training and validation data.")
    training: OfflineTrainingConfig = Field(default_factory=OfflineTrainingConfig, description="Optimisation.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources of the stage's actors.")

    @model_validator(mode="after")
    def _sections_fit(self) -> "_OfflineStage":
        where = f"stages.{self.name}"
        if self.training.batch_size < self.resources.num_learners:
            raise ValueError(
                f"{where}.resources.num_learners = {self.resources.num_learners} is more than training.batch_size = "
                f"{self.training.batch_size}: every learner needs a row of each batch; raise {where}.training.batch_size "
                f"or lower {where}.resources.num_learners"
            )
        if not has_reference(self.model.path):
            check_model_path(self.model.path, field=f"{where}.model.path")
            check_has_tokenizer(self.model.path, field=f"{where}.model.path")
        if self.model.quantization is not None:
            if self.model.lora is None:
                raise ValueError(
                    f"{where}.model.quantization = '{self.model.quantization}' needs {where}.model.lora: 4-bit weights "
                    "cannot be trained directly (QLoRA trains an adapter on them); add model.lora: {r: 16, alpha: 32}"
                )
            if self.resources.num_gpus <= 0:
                raise ValueError(
                    f"{where}.model.quantization = '{self.model.quantization}' needs a CUDA GPU (bitsandbytes); "
                    f"set {where}.resources.num_gpus=1, or remove model.quantization"
                )
        data = self.data
        if data.source.startswith(BUILTIN_MODEL_PREFIX) and data.source not in BUILTIN_DATASETS:
            raise ValueError(
                f"{where}.data.source = '{data.source}' is not a built-in data set; use one of {', '.join(BUILTIN_DATASETS)}"
            )
        if data.source in BUILTIN_DATASETS and data.format != "auto":
            raise ValueError(f"{where}.data.format = '{data.format}': built-in data sets have a fixed schema; remove format")
        try:
            resolve_format(data.source, data.format)
        except ValueError as error:
            raise ValueError(f"{where}.data.{error}") from None
        for split, fraction in data.fractions.items():
            if not 0 < fraction <= 1:
                raise ValueError(f"{where}.data.fractions.{split} = {fraction}: a share of the rows, in (0, 1]")
        total = sum(data.fractions.values())
        if total > 1 + 1e-9:
            raise ValueError(f"{where}.data.fractions sum to {total:.3f}; shares of the rows must sum to at most 1")
        for field, split in (("train_split", data.train_split), ("eval_split", data.eval_split)):
            if split is not None and split not in data.fractions:
                raise ValueError(
                    f"{where}.data.{field} = '{split}' is not a split of data.fractions ({', '.join(data.fractions)}); "
                    f"name one of them, or add '{split}' to data.fractions"
                )
        if data.test_split is not None and "test" in data.fractions:
            raise ValueError(
                f"{where}.data.fractions names a split 'test', but the stage holds out its own test split "
                f"(data.test_split = '{data.test_split}'); rename that fraction (e.g. val), or set {where}.data.test_split=null"
            )
        if data.eval_split == data.train_split:
            raise ValueError(f"{where}.data.eval_split = '{data.eval_split}' is also the train split; validate on a held-out split")
        return self

    def reference_fields(self) -> list[tuple[str, str]]:
        return path_fields(self.model_dump(mode="json"), parent_is_stage=True)


class SftStage(_OfflineStage):
    """Supervised fine-tuning with the prompt masked out of the loss."""

    kind: Literal["sft"] = Field(..., description="'sft': supervised fine-tuning; artefact = the model directory.")
    target: Literal["auto", "chosen", "text"] = Field(
        "auto",
        description=(
            "What the loss covers: 'chosen' = the chosen completion after its (masked) prompt; 'text' = the whole "
            "text (IMDB review, extra.text); 'auto' = chosen when the rows have one, else text."
        ),
    )


class RewardModelStage(_OfflineStage):
    """Reward-model training: Bradley-Terry on pairs (scalar, seqcls) or cross-entropy on labels (classifier)."""

    kind: Literal["reward_model"] = Field(..., description="'reward_model': artefact = a directory load_reward_model reads.")
    type: Literal["scalar", "seqcls", "classifier"] = Field(
        "scalar",
        description=(
            "'scalar': causal-LM body + linear head on the last token, Bradley-Terry loss; 'seqcls': transformers "
            "sequence classification (usually with model.lora), Bradley-Terry loss; 'classifier': frozen body, "
            "mean pool, MLP head, cross-entropy on labels, reward = P(positive)."
        ),
    )
    margin: float | Literal["score_gap"] | None = Field(
        None,
        description="Bradley-Terry margin: a constant, 'score_gap' (score_chosen - score_rejected, UltraFeedback), or null.",
    )
    center_coef: float = Field(0.0, ge=0, description="Weight of the reward-centring term mean((r_c + r_r)^2).")
    classifier_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in the classifier head's MLP.")

    @model_validator(mode="after")
    def _type_fits(self) -> "RewardModelStage":
        where = f"stages.{self.name}"
        if self.type == "classifier" and self.model.lora is not None:
            raise ValueError(
                f"{where}.model.lora is set, but a classifier reward model keeps its body frozen and trains the head "
                "alone; remove model.lora, or use type: seqcls"
            )
        if self.model.quantization is not None:
            raise ValueError(
                f"{where}.model.quantization = '{self.model.quantization}': reward models train on full-precision "
                "(or bfloat16) weights here; remove it (with model.lora, a 2B reward model fits one GPU in bfloat16)"
            )
        if self.type == "classifier" and self.margin is not None:
            raise ValueError(f"{where}.margin applies to pairwise (Bradley-Terry) training; remove it for type: classifier")
        return self


class DpoStage(_OfflineStage):
    """Direct Preference Optimisation of a LoRA adapter; the reference is the model with the adapter disabled."""

    kind: Literal["dpo"] = Field(..., description="'dpo': artefact = the LoRA adapter directory.")
    beta: float = Field(0.1, gt=0, description="DPO temperature β: how far the implicit reward may move from the reference.")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="'sigmoid' (DPO) or 'ipo' (squared loss on per-token means).")

    @model_validator(mode="after")
    def _needs_adapter(self) -> "DpoStage":
        if self.model.lora is None:
            raise ValueError(
                f"stages.{self.name}.model.lora is required for DPO: the reference policy is the model with its adapter "
                "disabled; add model.lora: {r: 8, alpha: 16}"
            )
        return self


class TrainStage(Section):
    """An RL run (`raylign train`), in this stage's directory."""

    name: str = Field(..., description="Stage name: its directory under output_dir and how later stages refer to it.")
    kind: Literal["train"] = Field(..., description="'train': an RL run; artefact = its final checkpoint directory.")
    run: dict[str, Any] = Field(
        ...,
        description=(
            "The run's config, as in `raylign train` (model, data, rollout, reward, algorithm, train, ...). "
            "output_dir and cluster come from the pipeline; seed defaults to the pipeline's."
        ),
    )

    @model_validator(mode="after")
    def _run_validates(self) -> "TrainStage":
        _validate_nested(self.name, "run", self.run, RunConfig, ("output_dir", "cluster"),
                         "the stage directory, the pipeline's cluster")
        return self

    def reference_fields(self) -> list[tuple[str, str]]:
        return [(f"run.{field}", value) for field, value in path_fields(self.run, parent_is_stage=False)]

    def run_config(self, output_dir: str, seed: int, cluster: ClusterConfig, artefacts: dict[str, str],
                   seeds: list[int] | None = None) -> RunConfig:
        """The RunConfig of this stage with references resolved, writing to `output_dir`; `seeds` (the
        pipeline's) apply unless the stage's run names its own."""
        data = {"seed": seed, **substitute_references(self.run, artefacts), "output_dir": output_dir,
                "cluster": cluster.model_dump()}
        if seeds and not self.run.get("seeds"):
            data["seeds"] = list(seeds)
        return _resolve_nested(self.name, "run", data, RunConfig)


class EvaluateStage(Section):
    """A comparison of models (`raylign evaluate`), in this stage's directory."""

    name: str = Field(..., description="Stage name: its directory under output_dir.")
    kind: Literal["evaluate"] = Field(..., description="'evaluate': score models on held-out prompts; artefact = the stage directory.")
    evaluation: dict[str, Any] = Field(
        ...,
        description=(
            "The evaluation, as in `raylign evaluate` (models, reference, data, rollout, reward, pass_k, judge, ...), "
            "models and paths given as '{stage}' where earlier stages made them. output_dir, seed and cluster come "
            "from the pipeline."
        ),
    )

    @model_validator(mode="after")
    def _evaluation_validates(self) -> "EvaluateStage":
        _validate_nested(self.name, "evaluation", self.evaluation, EvaluateConfig, ("output_dir", "cluster", "seed"),
                         "the stage directory, the pipeline's cluster and seed")
        return self

    def reference_fields(self) -> list[tuple[str, str]]:
        return [(f"evaluation.{field}", value) for field, value in path_fields(self.evaluation, parent_is_stage=False)]

    def evaluate_config(self, output_dir: str, seed: int, cluster: ClusterConfig, artefacts: dict[str, str]) -> EvaluateConfig:
        """The EvaluateConfig of this stage with references resolved, writing to `output_dir`."""
        data = {**substitute_references(self.evaluation, artefacts), "output_dir": output_dir, "seed": seed,
                "cluster": cluster.model_dump()}
        return _resolve_nested(self.name, "evaluation", data, EvaluateConfig)


class ReportStage(Section):
    """`raylign report` over earlier train stages (every seed of each), in this stage's directory."""

    name: str = Field(..., description="Stage name: its directory under output_dir.")
    kind: Literal["report"] = Field(..., description="'report': compare train stages across seeds; artefact = the stage directory.")
    runs: list[str] = Field(..., min_length=1, description="Names of the train stages to compare (each stage's seed runs are its seeds).")
    vary: list[str] = Field(default_factory=list, description="Fields varied on purpose within a method (`raylign report --vary`).")
    allow_different: list[str] = Field(
        default_factory=list, description="Fields allowed to differ anyway (`raylign report --allow-different`), e.g. total_samples."
    )
    threshold: float = Field(0.8, gt=0, le=1, description="Steps-to-threshold target as a share of each run's reward rise.")
    bootstrap_resamples: int = Field(10_000, ge=100, description="Bootstrap resamples of the across-seed intervals.")

    def reference_fields(self) -> list[tuple[str, str]]:
        return [(f"runs[{index}]", f"{{{name}}}") for index, name in enumerate(self.runs)]


def _validate_nested(stage: str, key: str, data: dict, model, owned: tuple[str, ...], owner: str) -> None:
    """Validate a stage's nested config before the pipeline runs, earlier stages' artefacts stood in by placeholders."""
    for name in owned:
        if name in data:
            raise ValueError(f"stages.{stage}.{key}.{name} is set by the pipeline ({owner}); remove it")
    placeholders = {name: f"{PLACEHOLDER_PREFIX}{name}" for name in referenced_stages(path_fields(data, False))}
    try:
        model.model_validate(substitute_references(data, placeholders))
    except ValidationError as error:
        lines = format_validation_error(error).splitlines()[1:]
        # A check that an artefact exists cannot pass before its stage has run; it runs again then.
        real = [line.strip() for line in lines if PLACEHOLDER_PREFIX not in line]
        if real:
            raise ValueError("\n  ".join(f"stages.{stage}.{key}: {line}" for line in real)) from None


def _resolve_nested(stage: str, key: str, data: dict, model):
    try:
        return model.model_validate(data)
    except ValidationError as error:
        lines = format_validation_error(error).splitlines()[1:]
        raise ConfigError("\n  ".join(f"stages.{stage}.{key}: {line.strip()}" for line in lines)) from None


Stage = Annotated[Union[SftStage, RewardModelStage, DpoStage, TrainStage, EvaluateStage, ReportStage],
                  Field(discriminator="kind")]
OfflineStage = Union[SftStage, RewardModelStage, DpoStage]


class PipelineConfig(Section):
    output_dir: str = Field("outputs/pipeline", description="Each stage writes to output_dir/<stage name>/; pipeline.json sums up.")
    seed: int = Field(0, description="Seed for every stage (data order, LoRA init, sampling); a train stage's run.seed overrides it.")
    seeds: list[int] | None = Field(
        None,
        description=(
            "Run every train stage once per seed (into <stage>/seed_<s>), e.g. [42, 123, 777]; offline stages (SFT, "
            "RM, DPO) still run once, at `seed`, so every seed shares their artefacts. A stage's run.seeds overrides it."
        ),
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray cluster the stages run on.")
    storage: str | None = Field(
        None,
        description=(
            "Where finished stages live for every node to read: a directory all nodes see (a shared filesystem) or "
            "a pyarrow.fs URI (s3://bucket/prefix, gs://bucket/prefix, hdfs://host/path, file:///path). Each stage "
            "still runs in output_dir/<stage>, is then uploaded to <storage>/<stage>, counts as done when "
            "<storage>/<stage>/results.json exists, and later stages' references name it there (a node opening it "
            "downloads it once into $XDG_CACHE_HOME/raylign/storage). null: artefacts stay in output_dir."
        ),
    )
    verbose: bool = Field(
        False,
        description=(
            "Show the actors' output (library warnings, engine logs) on the console; by default an offline stage's "
            "actors write theirs to <stage>/logs/offline.log and a train stage's to its run's logs/ (logging.verbose)."
        ),
    )
    stages: list[Stage] = Field(
        ..., min_length=1, description="Stages, run in order: sft, reward_model, dpo, train, evaluate or report."
    )

    @model_validator(mode="before")
    @classmethod
    def _unquoted_references(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("stages"), list):
            data = {**data, "stages": [_restore_references(stage, parent_is_stage=True) for stage in data["stages"]]}
        return data

    @field_validator("storage")
    @classmethod
    def _absolute_storage(cls, value: str | None) -> str | None:
        # Recorded in every stage's results: absolute, so actors and later runs elsewhere read the same place.
        if value is None or is_uri(value) or not value.strip():
            return value
        return str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _storage_scheme(self) -> "PipelineConfig":
        if self.storage is None:
            return self
        check_location(self.storage, field="storage")
        store, output = local_directory(self.storage), Path(self.output_dir).expanduser().resolve()
        if store is not None and (store == output or store in output.parents or output in store.parents):
            raise ValueError(
                f"storage = '{self.storage}' overlaps output_dir = '{self.output_dir}': each stage runs in "
                "output_dir/<stage> and is then uploaded to <storage>/<stage>, so they must be separate directories; "
                "point storage elsewhere, or leave it unset (artefacts then stay in output_dir)"
            )
        return self

    @model_validator(mode="after")
    def _names_and_references(self) -> "PipelineConfig":
        seen: list[str] = []
        for index, stage in enumerate(self.stages):
            if not STAGE_NAME.match(stage.name):
                raise ValueError(
                    f"stages[{index}].name = '{stage.name}': use letters, digits, '_' and '-' (it names a directory)"
                )
            if stage.name in seen:
                raise ValueError(f"stages.{stage.name}: two stages have this name; give each stage a distinct name")
            later = [s.name for s in self.stages[index + 1:]]
            for field, value in stage.reference_fields():
                for name in REFERENCE.findall(value):
                    if name in seen:
                        continue
                    if name == stage.name:
                        reason = "is this stage itself"
                    elif name in later:
                        reason = "runs later"
                    else:
                        reason = "does not exist"
                    available = ", ".join(f"'{{{s}}}'" for s in seen) or "none (this is the first stage)"
                    raise ValueError(
                        f"stages.{stage.name}.{field} = '{value}' refers to stage '{name}', which {reason}; "
                        f"a stage can use the artefacts of earlier stages: {available}"
                    )
            if isinstance(stage, ReportStage):
                for name in stage.runs:
                    if not isinstance(self.stage(name), TrainStage):
                        raise ValueError(
                            f"stages.{stage.name}.runs: '{name}' is a {self.stage(name).kind} stage; a report compares train stages"
                        )
            seen.append(stage.name)
        return self

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def dependents(self, names: set[str]) -> set[str]:
        """`names` plus every stage that uses their artefacts, directly or through other stages."""
        closure = set(names)
        for stage in self.stages:
            if referenced_stages(stage.reference_fields()) & closure:
                closure.add(stage.name)
        return closure


# ----- references -----


def has_reference(value: str) -> bool:
    return bool(REFERENCE.search(value))


def path_fields(data: Any, parent_is_stage: bool, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, value) of every string under a path key, at any depth."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            field = f"{prefix}{key}"
            if isinstance(value, str) and key in PATH_KEYS:
                found.append((field, value))
            elif isinstance(value, list) and key in PATH_KEYS and all(isinstance(item, str) for item in value):
                found.extend((f"{field}[{index}]", item) for index, item in enumerate(value))
            elif isinstance(value, (dict, list)):
                found.extend(path_fields(value, False, f"{field}."))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found.extend(path_fields(value, False, f"{prefix.rstrip('.')}[{index}]."))
    return found


def referenced_stages(fields: list[tuple[str, str]]) -> set[str]:
    return {name for _, value in fields for name in REFERENCE.findall(value)}


def substitute_references(data: Any, artefacts: dict[str, str]) -> Any:
    """A copy of `data` with every '{name}' in a path field replaced by artefacts[name]."""
    def resolve(value: str) -> str:
        return REFERENCE.sub(lambda m: artefacts.get(m.group(1), m.group(0)), value)

    if isinstance(data, dict):
        return {
            key: (resolve(value) if isinstance(value, str) and key in PATH_KEYS
                  else [resolve(item) if isinstance(item, str) else item for item in value]
                  if isinstance(value, list) and key in PATH_KEYS else substitute_references(value, artefacts))
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [substitute_references(value, artefacts) for value in data]
    return data


def resolve_stage(stage: Stage, artefacts: dict[str, str]) -> Stage:
    """An offline stage with its references replaced by artefact paths (validated again: they exist now).
    Train, evaluate and report stages are returned as they are (`run_config` and `evaluate_config` resolve theirs)."""
    if isinstance(stage, (TrainStage, EvaluateStage, ReportStage)):
        return stage
    data = substitute_references(stage.model_dump(mode="json"), artefacts)
    return type(stage).model_validate(data)


def _restore_references(data: Any, parent_is_stage: bool) -> Any:
    """YAML reads an unquoted `path: {sft}` as {'sft': None}; a path field is never a mapping, so read it back
    as the reference it was meant to be."""
    if isinstance(data, list):
        return [_restore_references(value, False) for value in data]
    if not isinstance(data, dict):
        return data
    restored = {}
    for key, value in data.items():
        is_path = key in PATH_KEYS and not (parent_is_stage and key == "data")
        if is_path and isinstance(value, dict) and len(value) == 1 and next(iter(value.values())) is None:
            restored[key] = "{" + str(next(iter(value))) + "}"
        else:
            restored[key] = _restore_references(value, False)
    return restored


# ----- loading -----


def apply_pipeline_overrides(data: dict, overrides: list[str]) -> dict:
    """`key=value` overrides; `stages.<name>.field=value` reaches into the stage called <name>."""
    for item in overrides:
        dotted = item.split("=", 1)[0]
        if dotted.startswith("stages."):
            parts = dotted.split(".")
            stages = data.get("stages") or []
            names = [s.get("name") for s in stages if isinstance(s, dict)]
            if len(parts) < 3 or parts[1] not in names:
                raise ConfigError(
                    f"override '{item}': write stages.<stage name>.<field>=value with one of the stages "
                    f"{', '.join(map(str, names)) or '(none)'}, e.g. stages.{names[0] if names else 'sft'}.training.steps=10"
                )
            apply_overrides(stages[names.index(parts[1])], [item.split(".", 2)[2]])
        else:
            apply_overrides(data, [item])
    return data


def format_pipeline_error(error: ValidationError, data: dict) -> str:
    """One line per problem, fields named as overrides name them (stages.<name>.training.steps)."""
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    lines = []
    for err in error.errors():
        loc = list(err["loc"])
        field = ".".join(str(p) for p in loc)
        if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
            raw = stages[loc[1]] if loc[1] < len(stages) and isinstance(stages[loc[1]], dict) else {}
            label = raw.get("name") or loc[1]
            # For a known kind pydantic puts the kind in the location: stages.0.sft.training.steps.
            rest = loc[3:] if len(loc) > 2 and loc[2] in STAGE_KINDS else loc[2:]
            field = ".".join(["stages", str(label), *map(str, rest)])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid":
            lines.append(f"{field}.kind = {err['input'].get('kind')!r} is not a stage kind; choose one of {', '.join(STAGE_KINDS)}")
        elif err["type"] == "union_tag_not_found":
            lines.append(f"{field}.kind: required; choose one of {', '.join(STAGE_KINDS)}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key; remove it or check the spelling (`raylign pipeline --help` lists the fields)")
        elif err["type"] == "missing":
            lines.append(f"{field}: required but missing; add it to the config")
        elif err["type"].startswith("value_error"):
            lines.append(message)
        else:
            lines.append(f"{field} = {err.get('input')!r}: {message}")
    return "invalid pipeline config:\n  " + "\n  ".join(lines)


def load_pipeline_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML, apply overrides, validate. Raises ConfigError naming field, value and fix."""
    data = read_yaml_mapping(path, "pipeline config", "configs/pipelines/gpt2_hh_rlhf_tiny.yaml")
    data = apply_pipeline_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_pipeline_error(exc, data)) from None


def describe_pipeline_fields() -> list[tuple[str, str, str]]:
    """(field, default, description) rows for `raylign pipeline --help`: top level, then each stage kind."""
    rows = [row for row in describe_fields(PipelineConfig) if row[0] != "stages"]
    shared = set(_OfflineStage.model_fields)
    rows.extend((f"stages[kind=sft|reward_model|dpo].{name}", default, description)
                for name, default, description in describe_fields(_OfflineStage))
    for cls in (SftStage, RewardModelStage, DpoStage, TrainStage, EvaluateStage, ReportStage):
        kind = cls.model_fields["kind"].annotation.__args__[0]
        rows.extend((f"stages[kind={kind}].{name}", default, description)
                    for name, default, description in describe_fields(cls)
                    if cls in (TrainStage, EvaluateStage, ReportStage) or name.split(".")[0] not in shared)
    rows.extend((f"stages[kind=evaluate].evaluation.{name}", default, description)
                for name, default, description in describe_fields(EvaluationSpec))
    return rows
