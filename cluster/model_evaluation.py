"""`raylign evaluate` and a pipeline's evaluate stage: every model on the same held-out prompts, scored alike.

For each model (and each seed of a seed-run model) the rollout actors sample `rollout.samples_per_prompt`
completions of every prompt, with the same per-prompt seeds and sampling settings for every model; the reward
actors score them unnormalised (each source kept apart); a `SequenceScorer` actor scores the same tokens under
the model and the named reference model (KL per sequence, reference perplexity, and the gap to the engine's
behaviour logprobs, which checks that the engine sampled the model that is scored). Models sharing a base and
an adapter shape share one set of rollout actors; each gets its adapter under a new version.

RL runs among the models must be comparable (`common.comparability`, as `raylign report` checks them);
`evaluation.json`, `evaluation.md`, `evaluation.tex`, the plots and `<model>_samples.jsonl` are written by
`cluster.evaluation_report`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import ray
import yaml

from raylign.cluster.console import actor_log_dir, remote_actor
from raylign.cluster.driver import user_errors
from raylign.cluster.evaluation import EVAL_SEED_OFFSET
from raylign.cluster.placement import with_threads
from raylign.cluster.prompts import PromptEncoder
from raylign.cluster.ray_setup import start_ray
from raylign.cluster.reward_pool import RewardPool
from raylign.cluster.rollout_pool import RolloutPool
from raylign.cluster.warm_actors import make_room
from raylign.common import statistics as stats
from raylign.common.comparability import SEED_RUN, IncomparableRuns, check_comparable, restore_pipeline_references
from raylign.common.config import (
    ConfigError,
    RewardConfig,
    RunConfig,
    apply_overrides,
    check_model_path,
    config_to_yaml,
    describe_fields,
    fields_help,
    format_validation_error,
    read_yaml_mapping,
)
from raylign.common.data import BUILTIN_REVIEWS, load_text_column, write_builtin_reviews
from raylign.common.eval_metrics import evaluation_metrics, sequence_kl
from raylign.common.evaluate_config import EvalModelConfig, EvaluateConfig
from raylign.common.storage import local_copy, stored_location
from raylign.common.tiny_model import resolve_builtin_model
from raylign.common.types import PromptItem, Sample, SamplingSettings
from raylign.learner.sequence_scorer import SequenceScorer

RESULTS = "evaluation.json"


@dataclass
class ModelInstance:
    """One evaluated model: a config entry, at one seed when it is a seed-run model."""

    name: str
    seed: int | None
    base: str  # the model the engines load
    adapter: str | None  # a PEFT LoRA adapter directory on it
    run_dir: Path | None = None  # the RL run it comes from
    checkpoint: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.seed is None else f"{self.name}@seed_{self.seed}"

    @property
    def samples_file(self) -> str:
        return f"{self.name}_samples.jsonl" if self.seed is None else f"{self.name}_seed_{self.seed}_samples.jsonl"


# ----- what each model entry is -----


def _seed_runs(path: Path) -> dict[int, Path]:
    runs = {}
    for config in path.glob("seed_*/config.yaml"):
        suffix = config.parent.name.removeprefix("seed_")
        if suffix.lstrip("-").isdigit():
            runs[int(suffix)] = config.parent
    return dict(sorted(runs.items()))


def _run_base(run_dir: Path) -> str:
    """The model an RL run's adapter sits on: its warm-started model, its built-in model, or model.path."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if (config.get("sft") or {}).get("steps", 0) > 0:
        return str(run_dir / "sft_model")
    path = config["model"]["path"]
    return str(run_dir / "base_model") if path.startswith("builtin:") else path


def _run_checkpoint(run_dir: Path, which: str, field: str) -> Path:
    if which == "best":
        best = run_dir / "checkpoints" / "best"
        if not (best / "adapter").is_dir():
            raise ValueError(
                f"{field}: the run {run_dir} has no checkpoints/best (it validated nothing); set eval.every in that "
                "run, or checkpoint: final"
            )
        return best
    results = run_dir / "results.json"
    if results.is_file() and json.loads(results.read_text()).get("final_checkpoint"):
        # By name inside this run directory: the recorded path is where the run was written (another node's
        # output_dir, for a run read back from a pipeline's storage).
        return run_dir / "checkpoints" / Path(json.loads(results.read_text())["final_checkpoint"]).name
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    if not steps:
        raise ValueError(f"{field}: the run {run_dir} has no checkpoint; did it finish?")
    return steps[-1]


def _from_run(entry: EvalModelConfig, run_dir: Path, seed: int | None, checkpoint: Path | None, field: str) -> ModelInstance:
    if entry.adapter is not None:
        raise ValueError(f"{field}.adapter: '{entry.path}' is an RL run, which brings its own adapter; remove adapter")
    if checkpoint is None or entry.checkpoint == "best":
        checkpoint = _run_checkpoint(run_dir, entry.checkpoint, field)
    return ModelInstance(entry.name, seed, _run_base(run_dir), str(checkpoint / "adapter"), run_dir, str(checkpoint))


def resolve_models(entry: EvalModelConfig, seeds: list[int] | None, build_dir: Path, build_seed: int) -> list[ModelInstance]:
    """The instances an entry stands for: one per seed of a directory of seed runs, else one."""
    field = f"models[name={entry.name!r}]"
    path = Path(entry.path)
    if path.is_dir() and _seed_runs(path):
        runs = _seed_runs(path)
        wanted = seeds if seeds is not None else list(runs)
        missing = [seed for seed in wanted if seed not in runs]
        if missing:
            raise ValueError(f"{field}.path = '{entry.path}' holds seeds {list(runs)}, not {missing}; fix evaluation.seeds")
        return [_from_run(entry, runs[seed], seed, None, field) for seed in wanted]
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return [_from_run(entry, path, None, None, field)]
    if (path / "driver_state.json").is_file():
        return [_from_run(entry, path.parent.parent, None, path, field)]
    check_model_path(entry.path, f"{field}.path")
    if entry.checkpoint == "best":
        raise ValueError(f"{field}.checkpoint = 'best' applies to RL runs; '{entry.path}' is a model")
    adapter = None if entry.adapter is None else local_copy(entry.adapter)  # an adapter in storage: this node's copy
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"{field}.adapter = '{entry.adapter}' holds no adapter_config.json; give a PEFT LoRA adapter directory")
    base = resolve_builtin_model(entry.path, build_dir / entry.name, build_seed)
    return [ModelInstance(entry.name, None, base, adapter)]


def check_models_comparable(instances: list[ModelInstance], config: EvaluateConfig):
    """The RL runs among the models must have run the same experiment (runs of one model: the same setting)."""
    runs = {}
    for instance in instances:
        if instance.run_dir is not None:
            run_config = yaml.safe_load((instance.run_dir / "config.yaml").read_text()) or {}
            # A pipeline stage's paths into its sibling stages compare as `{stage}` references, as in the report.
            stage_dir = instance.run_dir.parent if SEED_RUN.match(instance.run_dir.name) else instance.run_dir
            if (stage_dir.parent / "pipeline.yaml").is_file():
                run_config = restore_pipeline_references(run_config)
            runs[instance.label] = {**run_config, "method": instance.name}
    if len(runs) < 2:
        return None
    return check_comparable(runs, vary=config.vary, allow_different=config.allow_different,
                            vary_flag="evaluation.vary", allow_flag="evaluation.allow_different")


# ----- prompts -----


@dataclass
class EvalPrompts:
    texts: list[str]
    categories: dict[str, str]


def load_prompts(config: EvaluateConfig, data_dir: Path, instances: list[ModelInstance]) -> EvalPrompts:
    """The evaluation prompts, checked apart from every other split of their file and from what each RL run trained on."""
    data = config.data
    texts = load_text_column(data.prompts, data.prompt_field, data.split, data_dir=data_dir)
    if data.max_prompts is not None:
        texts = texts[: data.max_prompts]
    categories = {}
    if data.category_field is not None:
        labels = load_text_column(data.prompts, data.category_field, data.split, data_dir=data_dir)[: len(texts)]
        categories = dict(zip(texts, labels))
    check_held_out(config, texts, data_dir, instances)
    return EvalPrompts(texts, categories)


def check_held_out(config: EvaluateConfig, texts: list[str], data_dir: Path, instances: list[ModelInstance]) -> None:
    """Refuse an evaluation prompt that is also in another split of its file, or among an RL run's training prompts."""
    import datasets

    data, wanted = config.data, set(texts)
    source = str(write_builtin_reviews(data_dir)["prompts"]) if data.prompts == BUILTIN_REVIEWS else local_copy(data.prompts)
    if source.endswith((".json", ".jsonl")):
        rows = datasets.load_dataset("json", data_files=source, split="train")
        if "split" in rows.column_names:
            for prompt, split in zip(rows[data.prompt_field], rows["split"]):
                if split != data.split and prompt in wanted:
                    raise ValueError(
                        f"data.prompts = '{data.prompts}': prompt {prompt!r} is in split '{data.split}' and in split "
                        f"'{split}'; evaluation prompts must be held out of every other split"
                    )
    for run_dir in dict.fromkeys(i.run_dir for i in instances if i.run_dir is not None):
        trained = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data") or {}
        prompts = load_text_column(trained.get("prompts", BUILTIN_REVIEWS), trained.get("prompt_field", "prompt"),
                                   trained.get("split", "train"), data_dir=run_dir / "data")
        leaked = wanted.intersection(prompts)
        if leaked:
            raise ValueError(
                f"data: {len(leaked)} evaluation prompts are training prompts of the run {run_dir} (e.g. "
                f"{sorted(leaked)[0]!r}); evaluate on a split that run never trained on"
            )


def prompt_items(encoder: PromptEncoder, texts: list[str], split: str, seed: int) -> list[PromptItem]:
    """Prompts with fixed seeds: every model sees the same prompts with the same noise."""
    fitted = encoder.encode(texts, split)
    return [PromptItem(index=i, text=texts[k], token_ids=ids, seed=(EVAL_SEED_OFFSET + seed * 1_000_003 + k) % (2**31 - 1),
                       truncated=truncated)
            for i, (k, ids, truncated) in enumerate(zip(fitted.kept, fitted.token_ids, fitted.truncated))]


# ----- the evaluation -----


def for_actors(path: str | None) -> str | None:
    """A model path as the actors get it. The driver reads its node's copies of what a pipeline keeps in
    storage; actors, which may run on other nodes, get the storage URI (they make their own copies)."""
    return None if path is None else stored_location(path)


def reward_for_actors(reward: RewardConfig) -> RewardConfig:
    """The reward config with each reward model's path, and a seqcls_rm's adapter (options.adapter), as the
    actors get them (for_actors)."""
    def for_reward_actors(source):
        options = dict(source.options)
        if options.get("adapter") is not None:
            options["adapter"] = for_actors(options["adapter"])
        return source.model_copy(update={"path": for_actors(source.path), "options": options})

    return reward.model_copy(update={"sources": [for_reward_actors(source) for source in reward.sources]})


def pool_config(config: EvaluateConfig, base: str, lora_rank: int, verbose: bool = False) -> RunConfig:
    """The run config the rollout and reward pools read (model, data, rollout, reward, seed, cluster, and
    logging.verbose: whether the actors' output stays with Ray instead of going to output_dir/logs/)."""
    return with_threads(RunConfig(
        output_dir=config.output_dir, seed=config.seed, model={"path": base, "dtype": config.dtype, "lora": {"r": lora_rank}},
        data=config.data.model_dump(), rollout=config.rollout, reward=config.reward,
        # The algorithm is never run; REINFORCE accepts any samples_per_prompt.
        algorithm={"name": "reinforce"}, train={"num_cpus": config.scorer.num_cpus, "num_gpus": config.scorer.num_gpus},
        cluster=config.cluster, logging={"progress": False, "verbose": verbose},
    ))


def _adapter_shape(adapter: str | None) -> tuple | None:
    if adapter is None:
        return None
    spec = json.loads((Path(adapter) / "adapter_config.json").read_text())
    targets = spec.get("target_modules")
    return spec.get("r"), spec.get("lora_alpha"), tuple(sorted(targets)) if isinstance(targets, list) else targets


def rollout_groups(instances: list[ModelInstance]) -> list[tuple[tuple, list[ModelInstance], str | None]]:
    """Models that can share rollout actors: one base and one adapter shape, each model its own adapter version.

    A model without an adapter joins the first group of its base, sampled through a zero adapter of that
    group's shape (the third item names an adapter to copy the shape of); with no such group it gets actors of
    its own, which never hold an adapter (an engine cannot drop one)."""
    groups: dict[tuple, list[ModelInstance]] = {}
    templates: dict[tuple, str] = {}
    for instance in instances:
        if instance.adapter is not None:
            key = (instance.base, _adapter_shape(instance.adapter), None)
            groups.setdefault(key, []).append(instance)
            templates.setdefault(key, instance.adapter)
    for instance in instances:
        if instance.adapter is None:
            shared = next((key for key in templates if key[0] == instance.base), None)
            if shared is None:
                groups[(instance.base, None, instance.label)] = [instance]
            else:
                groups[shared].insert(0, instance)
    return [(key[:2], members, templates.get(key)) for key, members in groups.items()]


def evaluate(config: EvaluateConfig, verbose: bool = False) -> dict:
    """Evaluate every model; writes the outputs into config.output_dir and returns what evaluation.json holds.
    The actors write their output to output_dir/logs/<role>.log (rollout, reward, scorer), as a run's do;
    `verbose` leaves it to Ray (on the console when Ray forwards worker output)."""
    from raylign.cluster.evaluation_report import write_outputs

    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate.yaml").write_text(config_to_yaml(config))
    with user_errors():
        instances = [instance for entry in config.models
                     for instance in resolve_models(entry, config.seeds, out / "base_models", config.seed)]
        if config.reference is not None and len([i for i in instances if i.name == config.reference]) != 1:
            raise ValueError(f"reference = {config.reference!r} is a seed-run model; name a single model (e.g. the SFT model)")
        comparability = check_models_comparable(instances, config)
        prompts = load_prompts(config, out / "data", instances)
    reference = next((i for i in instances if i.name == config.reference), None)
    first = pool_config(config, for_actors(instances[0].base), 8, verbose)
    start_ray(first)
    log_dir = actor_log_dir(first)
    rewards = RewardPool(reward_for_actors(first.reward), log_dir=log_dir)
    make_room()  # the scorer is reserved outside a placement group: actors a pipeline kept must not hold its CPUs
    scorer = remote_actor(SequenceScorer, "scorer", log_dir).options(
        num_cpus=config.scorer.num_cpus, num_gpus=config.scorer.num_gpus).remote(
        for_actors(None if reference is None else reference.base), for_actors(None if reference is None else reference.adapter),
        config.dtype, "cuda" if config.scorer.num_gpus > 0 else "cpu", config.scorer.threads, config.scorer.batch_size,
        config.scorer.shared_prompt_forward)
    rollout = config.rollout
    settings = SamplingSettings(samples_per_prompt=rollout.samples_per_prompt, max_new_tokens=rollout.max_new_tokens,
                                min_new_tokens=rollout.min_new_tokens, temperature=rollout.temperature,
                                top_p=rollout.top_p, top_k=rollout.top_k)
    evaluated: dict[str, dict] = {}
    samples_of: dict[str, list[Sample]] = {}
    engines: dict[str, dict] = {}
    try:
        version = 0
        for (base, shape), members, zero_like in rollout_groups(instances):
            run = pool_config(config, for_actors(base), shape[0] if shape else 8, verbose)
            encoder = PromptEncoder(run, base)
            items = prompt_items(encoder, prompts.texts, config.data.split, config.seed)
            pool = RolloutPool(run, for_actors(base), max_model_len=encoder.max_model_len())
            try:
                for instance in members:
                    version += 1
                    update = ray.get(scorer.load_policy.remote(
                        for_actors(instance.base), for_actors(instance.adapter), version,
                        for_actors(zero_like if instance.adapter is None else None)))
                    if update is None:
                        ray.get([worker.use_base_model.remote(version) for worker in pool.workers])
                    else:
                        pool.publish(ray.put(update))
                    _log(f"{instance.label}: sampling {len(items)} prompts x {settings.samples_per_prompt}")
                    samples = pool.generate(items, settings)
                    evaluated[instance.label] = score_instance(instance, samples, rewards, scorer, settings, prompts, config, out)
                    samples_of[instance.label] = samples
                    engines[instance.label] = pool.plan.to_dict()
            finally:
                pool.release()
    finally:
        rewards.release()
        ray.kill(scorer)
    result = summarise(config, instances, evaluated, prompts, settings, comparability, None)
    for instance in instances:
        record = next(r for r in result["models"][instance.name]["runs"] if r["seed"] == instance.seed)
        record["rollout_engine"] = engines[instance.label]
    if config.judge is not None:
        # The numbers are on disk before the judge's endpoint is asked: a failing judge loses nothing else.
        write_outputs(result, out, finished=False)
        result["judge"] = run_judge(config, instances, samples_of)
    result["seconds"] = time.perf_counter() - start
    return write_outputs(result, out)


def score_instance(instance: ModelInstance, samples: list[Sample], rewards: RewardPool, scorer, settings: SamplingSettings,
                   prompts: EvalPrompts, config: EvaluateConfig, out: Path) -> dict:
    """Rewards, logprobs and every metric of one model's samples; writes its samples file."""
    scored = rewards.score_batch(samples, normalize=False)
    raw = scored.raw_rewards or scored.rewards
    if scored.errors:
        with (out / "reward_errors.jsonl").open("a") as f:
            for error in scored.errors:
                f.write(json.dumps({"model": instance.label, **error}, default=str) + "\n")
    logprobs = ray.get(scorer.score.remote(samples, settings))
    policy = [row["policy"] for row in logprobs]
    reference = [row["reference"] for row in logprobs] if config.reference is not None else None
    metrics = evaluation_metrics(
        [s.prompt for s in samples], [s.completion for s in samples], [len(s.completion_ids) for s in samples], raw,
        samples_per_prompt=settings.samples_per_prompt, pass_k=config.pass_k, pass_threshold=config.pass_threshold,
        components=scored.components, categories=prompts.categories or None, policy_logprobs=policy,
        reference_logprobs=reference, behaviour_logprobs=[s.behaviour_logprobs for s in samples],
        max_new_tokens=settings.max_new_tokens,
    )
    per_prompt = _per_prompt_means(raw, settings.samples_per_prompt)
    if len(per_prompt) >= 2:
        interval = stats.t_interval(per_prompt)
        metrics["reward_ci95_prompts"] = [interval.low, interval.high]
    kl = sequence_kl(policy, reference) if reference is not None else None
    with (out / instance.samples_file).open("w") as f:
        for index, (sample, reward) in enumerate(zip(samples, raw)):
            row = {"model": instance.name, "seed": instance.seed, "prompt": sample.prompt,
                   "category": prompts.categories.get(sample.prompt), "sample_index": sample.sample_index,
                   "completion": sample.completion, "num_tokens": len(sample.completion_ids),
                   "finish_reason": sample.finish_reason, "reward": reward,
                   "rewards": {label: values[index] for label, values in scored.components.items()}}
            if kl is not None:
                row.update(kl=kl["k3"][index], kl_k1=kl["k1"][index])
            f.write(json.dumps(row) + "\n")
    return metrics


def _per_prompt_means(rewards: list[float | None], k: int) -> list[float]:
    means = []
    for i in range(0, len(rewards), k):
        valid = [r for r in rewards[i:i + k] if r is not None]
        if valid:
            means.append(statistics.fmean(valid))
    return means


# ----- judge -----


def run_judge(config: EvaluateConfig, instances: list[ModelInstance], samples_of: dict[str, list[Sample]]) -> dict:
    """Win/tie/loss of each candidate against the baseline on the first sample per prompt, both orders."""
    from raylign.actors.judge import judge_win_rate
    from raylign.common.judge_config import JudgeConfig

    judge = config.judge
    baselines = {i.seed: i for i in instances if i.name == judge.baseline}
    endpoint = JudgeConfig(**judge.model_dump(include=set(JudgeConfig.model_fields)))
    candidates = judge.candidates or [m.name for m in config.models if m.name != judge.baseline]
    results: dict[str, dict] = {}
    for name in candidates:
        per_seed = []
        for instance in (i for i in instances if i.name == name):
            # A single baseline faces every candidate; a seed-run baseline faces each candidate at its own seed.
            opponent = baselines.get(None) or baselines.get(instance.seed)
            if opponent is None:
                raise ValueError(
                    f"judge: {instance.label} has no {judge.baseline} run at its seed to be judged against; a seed-run "
                    "baseline is judged seed by seed, so both models need the same seeds"
                )
            baseline = _first_per_prompt(samples_of[opponent.label])
            answers = _first_per_prompt(samples_of[instance.label])
            prompts = [p for p in answers if p in baseline][: judge.max_prompts]
            _log(f"judge: {instance.label} vs {opponent.label} on {len(prompts)} prompts, both orders")
            outcome = judge_win_rate(prompts, [answers[p] for p in prompts], [baseline[p] for p in prompts], endpoint)
            per_seed.append({"seed": instance.seed, **{k: v for k, v in outcome.items() if k not in ("records", "outcomes")}})
        wins, losses, ties = (sum(r[key] for r in per_seed) for key in ("wins", "losses", "ties"))
        pooled = {"wins": wins, "losses": losses, "ties": ties, "win_rate": None, "ci_low": 0.0, "ci_high": 1.0}
        if wins + losses + ties:
            rate = stats.win_rate_ci(wins, losses, ties, ties_as="half")
            pooled.update(win_rate=rate.rate, ci_low=rate.interval.low, ci_high=rate.interval.high)
        results[name] = {"per_seed": per_seed, "pooled": pooled}
    return {"baseline": judge.baseline, "model": judge.model, "ties_as": "half",
            "protocol": "each pair judged in both orders; a win or loss needs both orders to agree, else a tie",
            "models": results}


def _first_per_prompt(samples: list[Sample]) -> dict[str, str]:
    answers: dict[str, str] = {}
    for sample in samples:
        answers.setdefault(sample.prompt, sample.completion)
    return answers


# ----- numbers across models and seeds -----


def _seed_summary(values: list[float | None]) -> dict:
    finite = [v for v in values if isinstance(v, (int, float))]
    out = {"per_seed": values, "mean": statistics.fmean(finite) if finite else None, "std": None, "ci95_t": None}
    if len(finite) >= 2:
        out["std"] = statistics.stdev(finite)
        interval = stats.t_interval(finite)
        out["ci95_t"] = [interval.low, interval.high]
    return out


def summarise(config: EvaluateConfig, instances: list[ModelInstance], evaluated: dict[str, dict], prompts: EvalPrompts,
              settings: SamplingSettings, comparability, judged: dict | None) -> dict:
    models = {}
    for entry in config.models:
        members = [i for i in instances if i.name == entry.name]
        runs = [{"seed": i.seed, "base": i.base, "adapter": i.adapter, "checkpoint": i.checkpoint,
                 "run_dir": None if i.run_dir is None else str(i.run_dir), "samples_file": i.samples_file,
                 "metrics": evaluated[i.label]} for i in members]
        keys = list(dict.fromkeys(key for run in runs for key, value in run["metrics"].items() if isinstance(value, (int, float))))
        models[entry.name] = {
            "path": entry.path, "adapter": entry.adapter, "checkpoint": entry.checkpoint,
            "seeds": [i.seed for i in members if i.seed is not None] or None, "runs": runs,
            "summary": {key: _seed_summary([run["metrics"].get(key) for run in runs]) for key in keys},
        }
    pairwise = []
    seeded = [name for name, m in models.items() if m["seeds"] and len(m["seeds"]) >= 2]
    for a, b in combinations(seeded, 2):
        x, y = ([run["metrics"]["reward_mean"] for run in models[m]["runs"]] for m in (a, b))
        test = stats.welch_t_test(x, y)
        pairwise.append({"a": a, "b": b, "metric": "reward_mean", "n_a": len(x), "n_b": len(y),
                         "mean_difference": statistics.fmean(x) - statistics.fmean(y), "welch_t": test.t, "dof": test.dof,
                         "p_value": test.p_value, "cohens_d": stats.cohens_d(x, y)})
    categories = sorted(set(prompts.categories[p] for p in prompts.texts if p in prompts.categories))
    return {
        "prompts": {"source": config.data.prompts, "split": config.data.split, "count": len(prompts.texts),
                    "samples_per_prompt": settings.samples_per_prompt, "categories": categories},
        "sampling": {"samples_per_prompt": settings.samples_per_prompt, "max_new_tokens": settings.max_new_tokens,
                     "min_new_tokens": settings.min_new_tokens, "temperature": settings.temperature,
                     "top_p": settings.top_p, "top_k": settings.top_k, "seed": config.seed},
        "reference": config.reference,
        "reward_sources": [source.display_name for source in config.reward.resolved_sources()],
        "pass_k": list(config.pass_k), "pass_threshold": config.pass_threshold,
        "kl_definition": (
            "KL(model || reference) per sequence: the sum over completion tokens of k3 = exp(r) - 1 - r, r = log "
            "p_ref - log p_model, on the model's own samples (never negative); kl_k1 is the mean sum of log p_model "
            "- log p_ref (the seed gpt2_hh_rlhf's estimate). Both models at the sampling temperature and min-tokens "
            "EOS mask; the model under its sampling truncation."
        ),
        "uncertainty": (
            "a single model: 95% t interval over per-prompt mean rewards (reward_ci95_prompts); a seed-run model: "
            "mean, SD and 95% t interval across seeds; tests between models only across seeds"
        ),
        "comparability": None if comparability is None else comparability.to_json(),
        "models": models,
        "pairwise": pairwise,
        "judge": judged,
        "artefact": str(Path(config.output_dir).resolve()),
        "key_metrics": {f"{name}/reward_mean": m["summary"]["reward_mean"]["mean"] for name, m in models.items()},
    }


def _log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


# ----- command line -----


def load_evaluate_config(path: str, overrides: list[str] | None = None) -> EvaluateConfig:
    from pydantic import ValidationError

    data = apply_overrides(read_yaml_mapping(path, "evaluation config", "configs/evaluate_quickstart.yaml"), overrides or [])
    try:
        return EvaluateConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error).replace("invalid config", "invalid evaluation config")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylign evaluate",
        description=(
            "Score models (base, SFT, DPO adapters, RL runs or their best checkpoints, seed-run directories) on the "
            "same held-out prompts with the same sampling settings: reward per source, KL to a reference, length, "
            "diversity, pass@k, per-category reward, optional LLM judge. Writes evaluation.json/.md/.tex, plots and "
            "<model>_samples.jsonl to output_dir. Example: raylign evaluate configs/evaluate_quickstart.yaml data.max_prompts=16"
        ),
        epilog=fields_help("evaluation fields (set in YAML or override as field=value):", describe_fields(EvaluateConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="evaluation YAML file")
    parser.add_argument("overrides", nargs="*", help="field=value overrides (YAML values), e.g. data.max_prompts=20")
    parser.add_argument("--verbose", action="store_true",
                        help="the actors' and libraries' output (vLLM, transformers, Ray) on the console instead of output_dir/logs/")
    return parser


def evaluate_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_evaluate_config(args.config, args.overrides)
        result = evaluate(config, verbose=args.verbose)
    except (ConfigError, IncomparableRuns) as error:
        print(f"raylign evaluate: {error}", file=sys.stderr)
        return 2
    for name, model in result["models"].items():
        reward = model["summary"]["reward_mean"]
        print(f"{name}: reward {reward['mean']:.4g}" + (f" ± {reward['std']:.3g} over seeds {model['seeds']}" if reward["std"] else ""))
    print(f"evaluation: {Path(config.output_dir) / 'evaluation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main())
