"""Which runs may be compared: the fields a comparison holds equal, and the check of a list of run configs.

A comparison of methods means something only when the runs ran the same experiment. :func:`check_comparable`
reads the runs' ``config.yaml`` (absent fields at the schema's defaults) and refuses, naming runs, field and
values, when

- a **controlled** field (:data:`CONTROLLED_FIELDS`) differs between any two runs: every method is trained
  and scored on the same model, data, reward, sampling, sample budget and evaluation set;
- any other field differs between two runs of one method: runs of a method are seeds of one setting, so
  they may differ only in ``seed``, ``output_dir`` and how they ran (:data:`RUNTIME_FIELDS`).

``vary`` names fields varied on purpose within a method (the τ ablation's ``algorithm.tau_start``);
``allow_different`` names fields, controlled or not, accepted to differ anyway. Either takes a section
(``model``) for every field below it. What was held equal and what was allowed to differ comes back as a
:class:`Comparability`, for the report to print.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from raylign.common.config import RewardSourceConfig, RunConfig

# The sample budget, train.steps × train.prompts_per_step × rollout.samples_per_prompt: a derived field, since
# methods reach it differently (PPO with one sample per prompt, GRPO with a group of K).
TOTAL_SAMPLES = "total_samples"

# A run directory `seeds:` wrote: <output_dir>/seed_<s>.
SEED_RUN = re.compile(r"^seed_-?\d+$")

# Fields every run of a comparison shares; a name covers the fields below it.
CONTROLLED_FIELDS: tuple[str, ...] = (
    # The policy that learns: base weights, dtype and adapter shape, and the SFT warm start it begins from.
    "model",
    "sft",
    # What it learns from: prompt set, split, columns, chat template. Another prompt set is another task.
    "data",
    # What "reward" means: the scored sources, their paths, weights and options (a `reward.function` counts as
    # one source of weight 1). Normalisation is left to the method, since the reward is logged before it.
    "reward.sources",
    # How completions are sampled: temperature and length move reward and KL by themselves.
    "rollout.temperature",
    "rollout.top_p",
    "rollout.top_k",
    "rollout.max_new_tokens",
    "rollout.min_new_tokens",
    # Equal compute: a method given more samples learns more whatever its merit.
    TOTAL_SAMPLES,
    # How every method is scored: validation and test splits, their sizes, sampling and the adapter tested.
    "eval",
)

# What makes a run one run of a setting: its seed, where it wrote, its label.
IDENTITY_FIELDS: tuple[str, ...] = ("seed", "seeds", "output_dir", "method")

# How and where a run ran: resources, parallelism, restarts, guards that stop a run, logging, checkpointing and
# resuming (a resumed run reproduces the uninterrupted one). They change speed, not the experiment.
RUNTIME_FIELDS: tuple[str, ...] = (
    "rollout.num_workers", "rollout.num_cpus", "rollout.num_gpus", "rollout.threads", "rollout.max_restarts",
    "rollout.keep_versions", "rollout.dispatch_chunk", "rollout.vllm_kv_cache_gib",
    "rollout.vllm_gpu_memory_utilization", "rollout.sync_tolerance",
    "reward.num_workers", "reward.num_cpus", "reward.num_gpus", "reward.threads", "reward.max_restarts",
    "reward.batch_size", "reward.max_invalid_fraction",
    "train.num_cpus", "train.num_gpus", "train.threads", "train.micro_batch_size", "train.checkpoint_every",
    "train.resume_from",
    "logging", "cluster",
)


class IncomparableRuns(ValueError):
    """Runs that did not run the same experiment; the message names the runs, the field, the values and the flag."""


@dataclass(frozen=True)
class Difference:
    """A field whose value is not the same in every run: each run's value, by run name."""

    field: str
    values: dict[str, Any]

    def by_value(self) -> list[tuple[Any, list[str]]]:
        """Each distinct value with the runs that have it, in order of first appearance."""
        groups: list[tuple[Any, list[str]]] = []
        for run, value in self.values.items():
            group = next((names for seen, names in groups if seen == value), None)
            if group is None:
                groups.append((value, [run]))
            else:
                group.append(run)
        return groups


@dataclass(frozen=True)
class Comparability:
    """What a comparison held equal (controlled field -> the value of every run) and what it let differ."""

    held_equal: dict[str, Any]
    allowed: list[Difference]
    varied: list[Difference]

    def to_json(self) -> dict:
        return {
            "controlled_fields": list(CONTROLLED_FIELDS),
            "held_equal": self.held_equal,
            "allowed_differences": {d.field: d.values for d in self.allowed},
            "varied": {d.field: d.values for d in self.varied},
        }


def method_of(config: Mapping) -> str | None:
    """A run's method: `method` in its config when set, else `algorithm.name`."""
    return config.get("method") or (config.get("algorithm") or {}).get("name")


def _section(annotation: Any) -> type[BaseModel] | None:
    is_model = isinstance(annotation, type) and not get_args(annotation) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def _json(value: Any) -> Any:
    """Tuples as lists, as a value read back from config.yaml has them."""
    return json.loads(json.dumps(value))


def resolved_config(config: Mapping, model: type[BaseModel] = RunConfig) -> dict:
    """``config`` with every absent field at its schema default, without validating it: the model and data a
    finished run read need not exist where its config is compared. Required fields absent stay None; keys the
    schema does not know are kept and compared as they are."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        items = get_args(field.annotation)[0] if get_origin(field.annotation) is list else None
        if name in config:
            value = config[name]
        elif section is not None:
            value = {}
        else:
            value = None if field.is_required() else _json(field.get_default(call_default_factory=True))
        if section is not None and isinstance(value, Mapping):
            value = resolved_config(value, section)
        elif _section(items) is not None and isinstance(value, list):
            value = [resolved_config(item, items) if isinstance(item, Mapping) else item for item in value]
        out[name] = value
    out.update({key: value for key, value in config.items() if key not in model.model_fields})
    return _json(out)


def _flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def experiment_fields(config: Mapping) -> dict[str, Any]:
    """The resolved config as dotted field -> value, `reward.function` folded into `reward.sources` and the
    sample budget added as `total_samples`."""
    resolved = resolved_config(config)
    reward = resolved["reward"]
    if isinstance(reward, dict) and not reward.get("sources") and reward.get("function") is not None:
        reward["sources"] = [resolved_config({"name": reward["function"]}, RewardSourceConfig)]
    if isinstance(reward, dict):
        reward.pop("function", None)
    flat = _flatten(resolved)
    budget = [flat.get("train.steps"), flat.get("train.prompts_per_step"), flat.get("rollout.samples_per_prompt")]
    flat[TOTAL_SAMPLES] = budget[0] * budget[1] * budget[2] if all(isinstance(n, int) for n in budget) else None
    return flat


def restore_pipeline_references(config: Mapping) -> dict:
    """A pipeline stage's config with its sibling stages' artefact paths written back as `{stage}` references.

    A pipeline runs every stage in ``<pipeline output_dir>/<stage>`` (a stage with seeds in
    ``<stage>/seed_<s>``), so a stage run at another pipeline seed names another directory for the same `{sft}`;
    read back as references, runs of the same stage at two seeds compare equal.
    """
    if not config.get("output_dir"):
        return dict(config)
    run_dir = Path(config["output_dir"])
    stage_dir = run_dir.parent if SEED_RUN.match(run_dir.name) else run_dir
    root = str(stage_dir.parent) + "/"

    def restore(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(root):
            stage, slash, rest = value[len(root):].partition("/")
            return f"{{{stage}}}{slash}{rest}"
        if isinstance(value, Mapping):
            return {key: restore(item) for key, item in value.items()}
        if isinstance(value, list):
            return [restore(item) for item in value]
        return value

    return {key: value if key == "output_dir" else restore(value) for key, value in config.items()}


def _covers(name: str, field: str) -> bool:
    return field == name or field.startswith(name + ".")


def _covered(field: str, names: Iterable[str]) -> bool:
    return any(_covers(name, field) for name in names)


def _label(field: str) -> str:
    if field == TOTAL_SAMPLES:
        return f"{TOTAL_SAMPLES} (train.steps × train.prompts_per_step × rollout.samples_per_prompt)"
    return field


def _values(difference: Difference) -> str:
    return "; ".join(f"{json.dumps(value)} in {', '.join(runs)}" for value, runs in difference.by_value())


def _check_flags(known: list[str], vary: list[str], allow_different: list[str], vary_flag: str, allow_flag: str):
    for flag, names in ((vary_flag, vary), (allow_flag, allow_different)):
        for name in names:
            if not any(_covers(name, field) for field in known):
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}?" if close else "`raylign train --help` lists the fields"
                raise IncomparableRuns(f"{flag} {name}: no run's config has this field; {hint}")
    for name in vary:
        controlled = [field for field in known if _covers(name, field) and _covered(field, CONTROLLED_FIELDS)]
        if controlled and not _covered(controlled[0], allow_different):
            raise IncomparableRuns(
                f"{vary_flag} {name}: {controlled[0]} is a controlled field, held equal across every run and method, "
                f"so it cannot vary within a method alone; pass {allow_flag} {controlled[0]} to let it differ anyway"
            )


def check_comparable(configs: Mapping[str, Mapping], *, vary: Iterable[str] = (), allow_different: Iterable[str] = (),
                     vary_flag: str = "--vary", allow_flag: str = "--allow-different") -> Comparability:
    """Refuse runs (run name -> config as read from its config.yaml) that did not run the same experiment.

    Raises :class:`IncomparableRuns` listing every mismatch with the runs, both values and the flag that allows
    it (``vary_flag``, ``allow_flag``: how the caller spells ``vary`` and ``allow_different`` to its user).
    """
    vary, allow_different = list(vary), list(allow_different)
    fields = {run: experiment_fields(config) for run, config in configs.items()}
    methods = {run: method_of(resolved_config(config)) for run, config in configs.items()}
    known = list(dict.fromkeys(field for flat in fields.values() for field in flat))
    _check_flags(known, vary, allow_different, vary_flag, allow_flag)
    held, allowed, varied, controlled_problems, method_problems = {}, [], [], [], []
    for field in known:
        if _covered(field, IDENTITY_FIELDS + RUNTIME_FIELDS):
            continue
        difference = Difference(field, {run: flat.get(field) for run, flat in fields.items()})
        if _covered(field, CONTROLLED_FIELDS):
            if len(difference.by_value()) == 1:
                held[field] = difference.by_value()[0][0]
            elif _covered(field, allow_different):
                allowed.append(difference)
            else:
                controlled_problems.append(f"{_label(field)}: {_values(difference)} ({allow_flag} {field})")
            continue
        within = {}
        for method in dict.fromkeys(methods.values()):
            runs = Difference(field, {run: value for run, value in difference.values.items() if methods[run] == method})
            if len(runs.by_value()) > 1:
                within[method] = runs
        if not within:
            continue
        if _covered(field, allow_different):
            allowed.append(difference)
        elif _covered(field, vary):
            varied.append(difference)
        else:
            method_problems += [f"{field} in method {method!r}: {_values(runs)} ({vary_flag} {field})"
                                for method, runs in within.items()]
    if controlled_problems or method_problems:
        lines = ["these runs did not run the same experiment."]
        if controlled_problems:
            lines.append(f"Controlled fields differ; every run and method must share them. To compare the runs anyway, "
                         f"pass {allow_flag} FIELD for each:")
            lines += [f"  - {problem}" for problem in controlled_problems]
        if method_problems:
            lines.append(f"Fields differ between runs of one method, which are seeds of one setting. Pass {vary_flag} "
                         f"FIELD for a field varied on purpose, {allow_flag} FIELD for one that is not, or give each "
                         "setting its own `method:` name:")
            lines += [f"  - {problem}" for problem in method_problems]
        raise IncomparableRuns("\n".join(lines))
    return Comparability(held, allowed, varied)
