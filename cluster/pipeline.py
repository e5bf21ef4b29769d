"""`raylign pipeline CONFIG`: named stages in order, on Ray, each stage's artefact feeding the next by path.

Every stage runs in `output_dir/<stage name>/`. Offline stages (sft, reward_model, dpo) run in
`resources.num_learners` data-parallel `OfflineTrainer` actors (one STRICT_PACK placement group); a train stage is an RL run of the driver, once per seed when
it has seeds (`<stage>/seed_<s>/`, every seed on the same SFT and reward-model artefacts); an evaluate stage
scores models (`cluster.model_evaluation`); a report stage compares train stages across seeds
(`cluster.report`). A stage whose
`results.json` exists is done and is skipped on a re-run, unless forced; forcing a stage also re-runs every
stage that uses its artefact. `pipeline.json` records each stage's status, artefact, seconds and key metrics,
and is rewritten after every stage, so a failed run shows how far it got.

With `storage` (a directory every node sees, or a pyarrow.fs URI) a finished stage directory is uploaded to
`<storage>/<stage>/`; a stage is done when `<storage>/<stage>/results.json` exists, and later stages refer to
its artefact there, so a stage may run on a node that never saw the earlier stages' output_dir.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from raylign.cluster.warm_actors import keeping_actors
from raylign.common.config import ConfigError, RewardConfig, RolloutConfig, TrainConfig, config_to_yaml, fields_help
from raylign.common.evaluate_config import ScorerConfig
from raylign.common.pipeline_config import (
    REFERENCE,
    EvaluateStage,
    PipelineConfig,
    ReportStage,
    Stage,
    TrainStage,
    describe_pipeline_fields,
    load_pipeline_config,
    referenced_stages,
    resolve_stage,
)
from raylign.common.storage import StorageError, check_reachable, forget_done, is_uri, join, local_copy, read_text, upload_dir

SUMMARY = "pipeline.json"
STAGE_MARKER = ".pipeline-stage"
# What pipeline.json shows of each stage's results, by kind.
KEY_METRICS = {
    "sft": ("loss_last", "eval/loss_before", "eval/loss", "eval/perplexity"),
    "reward_model": ("val/accuracy", "val/loss", "val/margin_mean", "num_mistakes"),
    "dpo": ("rewards/margins", "rewards/accuracies", "eval/rewards/margins", "eval/rewards/accuracies"),
    "train": ("reward_first_10pct", "reward_last_10pct", "kl_last", "logprob_gap_max", "test/reward_mean"),
}


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and the cause."""


def run_pipeline(config: PipelineConfig, force: bool | Iterable[str] = False) -> dict:
    """Run every stage not yet done (or forced), in order; returns what pipeline.json holds."""
    output_dir = Path(config.output_dir).resolve()
    if config.storage is not None:
        try:
            check_reachable(config.storage, field="storage")
        except StorageError as error:
            raise ConfigError(str(error)) from None
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "pipeline.yaml").write_text(config_to_yaml(config))
    rerun = stages_to_rerun(config, force)
    summary = {"output_dir": str(output_dir), "seconds": 0.0,
               "stages": [{"name": s.name, "kind": s.kind, "status": "pending"} for s in config.stages]}
    artefacts: dict[str, str] = {}
    start = time.perf_counter()
    with keeping_actors():  # each stage's actors serve the next stage of the same shape (cluster/warm_actors.py)
        for row, stage in zip(summary["stages"], config.stages):
            run_or_skip(stage, row, output_dir, config, rerun, artefacts, summary, start)
    return _write_summary(output_dir, summary, start)


def run_or_skip(stage: Stage, row: dict, output_dir: Path, config: PipelineConfig, rerun: set[str],
                artefacts: dict[str, str], summary: dict, start: float) -> None:
    """One stage: skipped when done before (and not forced), else run, stored, and recorded in `row`."""
    stage_dir = output_dir / stage.name
    stored = None if config.storage is None else join(config.storage, stage.name)
    previous = read_results(stage_dir) if stored is None else read_stored_results(stored)
    if previous is not None and stage.name not in rerun:
        row.update(status="skipped", **stage_summary(stage, previous))
        artefacts[stage.name] = row["artefact"]
        _log(f"stage '{stage.name}' ({stage.kind}): done before, skipped (--force {stage.name} re-runs it)")
        return
    row["status"] = "running"
    _write_summary(output_dir, summary, start)
    _log(f"stage '{stage.name}' ({stage.kind}): running in {stage_dir}")
    stage_start = time.perf_counter()
    try:
        clear_stage_dir(stage_dir)
        if stored is not None:
            forget_done(stored)
        results = run_stage(stage, stage_dir, config, artefacts)
        if stored is not None:
            results = store_stage(stage, stage_dir, stored, results)
    except Exception as error:
        cause = getattr(error, "cause", None) or error
        row.update(status="failed", seconds=time.perf_counter() - stage_start, error=f"{type(cause).__name__}: {cause}")
        _write_summary(output_dir, summary, start)
        raise PipelineError(f"stage '{stage.name}' ({stage.kind}) failed: {type(cause).__name__}: {cause}") from error
    finally:
        gc.collect()
    row.update(status="done", **stage_summary(stage, results))
    row["seconds"] = time.perf_counter() - stage_start
    artefacts[stage.name] = row["artefact"]
    _write_summary(output_dir, summary, start)
    _log(f"stage '{stage.name}' ({stage.kind}): done in {row['seconds']:.1f} s, artefact {row['artefact']}")


def run_stage(stage: Stage, stage_dir: Path, config: PipelineConfig, artefacts: dict[str, str]) -> dict:
    """One stage with its references resolved: an RL run of the driver, or a group of OfflineTrainer actors."""
    from raylign.cluster.console import remote_actor
    from raylign.cluster.placement import first_failure_or_all, release_ranks, start_ranks

    if isinstance(stage, ReportStage):
        return run_report_stage(stage, stage_dir, config)
    start_pipeline_ray(config)
    check_gpus(stage)
    if isinstance(stage, TrainStage):
        return run_train_stage(stage, stage_dir, config, artefacts)
    if isinstance(stage, EvaluateStage):
        from raylign.cluster.model_evaluation import evaluate

        local = local_artefacts(config, artefacts, referenced_stages(stage.reference_fields()))
        return evaluate(stage.evaluate_config(str(stage_dir), config.seed, config.cluster, local), verbose=config.verbose)
    from raylign.learner.offline_jobs import OfflineTrainer

    resolved = resolve_stage(stage, artefacts)
    resources = resolved.resources
    log_dir = None if config.verbose else str(stage_dir.resolve() / "logs")
    reuse_key = ("offline", resources.num_learners, resources.num_cpus, resources.num_gpus, log_dir is None)
    placement, trainers = start_ranks(remote_actor(OfflineTrainer, "offline", log_dir), resources.num_learners, resources.num_cpus,
                                      resources.num_gpus, config.seed, resources.threads, resources.num_gpus > 0,
                                      log_dir=log_dir, reuse_key=reuse_key)
    try:
        return first_failure_or_all([getattr(t, resolved.kind).remote(resolved, str(stage_dir)) for t in trainers])[0]
    finally:
        release_ranks(placement, trainers, reuse_key)


def local_artefacts(config: PipelineConfig, artefacts: dict[str, str], names: set[str]) -> dict[str, str]:
    """The artefacts of stages `names` as paths on this node. An evaluation reads an RL run's directory around
    its checkpoint (config.yaml, checkpoints/), so the whole stage directory is copied, not the artefact alone."""
    if config.storage is None:
        return artefacts
    local = dict(artefacts)
    for name in names & set(artefacts):
        root = join(config.storage, name)
        inside = artefacts[name][len(root):] if artefacts[name].startswith(root) else None
        local[name] = local_copy(artefacts[name]) if inside is None else local_copy(root) + inside
    return local


def run_train_stage(stage: TrainStage, stage_dir: Path, config: PipelineConfig, artefacts: dict[str, str]) -> dict:
    """One RL run, or one per seed into stage_dir/seed_<s>; with seeds the stage directory is the artefact and
    its results.json holds each seed's results and the mean of the key metrics."""
    from raylign.cluster.driver import train_each_seed

    run = stage.run_config(str(stage_dir), config.seed, config.cluster, artefacts, config.seeds)
    runs = train_each_seed(run)
    if not run.seeds:
        return runs[0]
    key_metrics = {}
    for key in KEY_METRICS["train"]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if len(values) == len(runs):
            key_metrics[key] = sum(values) / len(values)
    results = {"artefact": str(stage_dir.resolve()), "seeds": list(run.seeds), "runs": runs,
               "wall_seconds": sum(r["wall_seconds"] for r in runs), "key_metrics": key_metrics}
    (stage_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def run_report_stage(stage: ReportStage, stage_dir: Path, config: PipelineConfig) -> dict:
    """`raylign report` over the named train stages (every seed run of each), written into the stage directory."""
    from raylign.cluster.report import write_report

    start = time.perf_counter()
    output_dir = Path(config.output_dir).resolve()
    runs = [output_dir / name if config.storage is None else Path(local_copy(join(config.storage, name))) for name in stage.runs]
    comparison = write_report(runs, stage_dir, threshold=stage.threshold,
                              n_resamples=stage.bootstrap_resamples, seed=config.seed, vary=stage.vary,
                              allow_different=stage.allow_different)
    key_metrics = {f"{method}/final_reward": m["final_reward"]["mean"] for method, m in comparison["methods"].items()}
    results = {"artefact": str(stage_dir.resolve()), "seconds": time.perf_counter() - start, "key_metrics": key_metrics}
    (stage_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def clear_stage_dir(stage_dir: Path) -> None:
    """Start a stage in an empty directory: leftovers of a failed or forced run (appended metrics, old
    checkpoints) would mix in. Only a directory a pipeline stage wrote (it holds the marker) is deleted."""
    if stage_dir.exists():
        if not (stage_dir / STAGE_MARKER).is_file() and any(stage_dir.iterdir()):
            raise PipelineError(
                f"{stage_dir} exists and was not written by a pipeline stage, so it is left alone; "
                "move it away or choose another output_dir"
            )
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    (stage_dir / STAGE_MARKER).write_text("written by `raylign pipeline`; deleted when the stage re-runs\n")


def stages_to_rerun(config: PipelineConfig, force: bool | Iterable[str]) -> set[str]:
    """Stage names to run even if done: all (force=True), none (False), or the named ones and their dependents."""
    if force is True:
        return {stage.name for stage in config.stages}
    if not force:
        return set()
    names = set(force)
    known = [stage.name for stage in config.stages]
    unknown = sorted(names - set(known))
    if unknown:
        raise ConfigError(f"--force {' '.join(unknown)}: no such stage; the stages are {', '.join(known)}")
    return config.dependents(names)


def read_results(stage_dir: Path) -> dict | None:
    path = stage_dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_stored_results(stored: str) -> dict | None:
    """results.json of a stage in storage, its artefact named where it lies there: `stored_artefact` is
    relative to the stage's storage directory ("." for the directory itself), so a storage root that was
    moved or copied elsewhere still names its own files; an absolute one (outside the stage) is taken as is."""
    text = read_text(join(stored, "results.json"))
    if text is None:
        return None
    results = json.loads(text)
    place = results.get("stored_artefact")
    if place:
        results["artefact"] = place if is_uri(place) or Path(place).is_absolute() else join(stored, *relative_parts(place))
    return results


def relative_parts(place: str) -> list[str]:
    return [part for part in place.split("/") if part not in ("", ".")]


def store_stage(stage: Stage, stage_dir: Path, stored: str, results: dict) -> dict:
    """Upload a finished stage to `stored`; its results.json there also names the artefact's place inside the
    stage's storage directory (`stored_artefact`, see `read_stored_results`), which is what later stages and
    re-runs use. Returns the results with the artefact's location in storage."""
    artefact = Path(stage_summary(stage, results)["artefact"])
    try:
        inside = artefact.resolve().relative_to(stage_dir.resolve())
    except ValueError:  # not written into the stage directory (none of the stage kinds does this)
        inside = None
    place = str(artefact) if inside is None else ("/".join(inside.parts) or ".")
    results_file = stage_dir / "results.json"
    on_disk = json.loads(results_file.read_text()) if results_file.is_file() else results
    results_file.write_text(json.dumps({**on_disk, "stored_artefact": place}, indent=2))
    _log(f"stage '{stage.name}' ({stage.kind}): uploading {stage_dir} to {stored}")
    upload_dir(stage_dir, stored)
    return {**results, "artefact": str(artefact) if inside is None else join(stored, *relative_parts(place))}


def stage_summary(stage: Stage, results: dict) -> dict:
    """Artefact, seconds and key metrics of a finished stage, from its results."""
    artefact = results.get("artefact") or results["final_checkpoint"]
    seconds = results.get("wall_seconds") if isinstance(stage, TrainStage) else results.get("seconds")
    if "key_metrics" in results:
        metrics = dict(results["key_metrics"])
    else:
        metrics = {key: results[key] for key in KEY_METRICS.get(stage.kind, ()) if key in results}
    return {"artefact": artefact, "seconds": seconds, "metrics": metrics}


def start_pipeline_ray(config: PipelineConfig) -> None:
    """Join `cluster.address`, reuse a running Ray, or start one locally that fits the largest stage."""
    from raylign.cluster.ray_setup import init_ray

    init_ray(config.cluster, max(stage_cpus(stage) for stage in config.stages), config.verbose)


def stage_cpus(stage: Stage) -> float:
    """CPUs Ray must have for the stage's actors to start (logical: they time-share the real cores)."""
    if isinstance(stage, ReportStage):
        return 0.0
    if isinstance(stage, EvaluateStage):
        spec = stage.evaluation
        return (_value(spec, "rollout", "num_cpus", RolloutConfig) * _value(spec, "rollout", "num_workers", RolloutConfig)
                + _value(spec, "reward", "num_cpus", RewardConfig) * _value(spec, "reward", "num_workers", RewardConfig)
                + _value(spec, "scorer", "num_cpus", ScorerConfig))
    if not isinstance(stage, TrainStage):
        return stage.resources.num_cpus * stage.resources.num_learners
    return (_run_value(stage, "train", "num_cpus", TrainConfig) * _run_value(stage, "train", "num_learners", TrainConfig)
            + _run_value(stage, "rollout", "num_cpus", RolloutConfig) * _run_value(stage, "rollout", "num_workers", RolloutConfig)
            + _run_value(stage, "reward", "num_cpus", RewardConfig) * _run_value(stage, "reward", "num_workers", RewardConfig))


def check_gpus(stage: Stage) -> None:
    """Refuse a stage whose actor asks for more GPUs than the cluster has: Ray would wait for them forever."""
    import ray

    available = ray.cluster_resources().get("GPU", 0.0)
    if isinstance(stage, EvaluateStage):
        requests = [(f"evaluation.{section}.num_gpus", _value(stage.evaluation, section, "num_gpus", model))
                    for section, model in (("rollout", RolloutConfig), ("reward", RewardConfig), ("scorer", ScorerConfig))]
    elif isinstance(stage, TrainStage):
        requests = [(f"run.{section}.num_gpus", _run_value(stage, section, "num_gpus", model))
                    for section, model in (("train", TrainConfig), ("rollout", RolloutConfig), ("reward", RewardConfig))]
    else:
        requests = [("resources.num_gpus", stage.resources.num_gpus)]
    if not isinstance(stage, (EvaluateStage, TrainStage)) and stage.resources.num_learners > 1:
        learners = stage.resources.num_learners
        if stage.resources.num_gpus * learners > available:
            raise ConfigError(
                f"stages.{stage.name}.resources: num_learners = {learners} with num_gpus = {stage.resources.num_gpus:g} "
                f"each needs {stage.resources.num_gpus * learners:g} GPUs, but the Ray cluster has {available:g}; "
                f"lower stages.{stage.name}.resources.num_learners"
            )
    for field, value in requests:
        if value > available:
            raise ConfigError(
                f"stages.{stage.name}.{field} = {value:g}, but the Ray cluster has {available:g} GPUs; run on a GPU "
                f"node (or join a cluster with cluster.address), or override stages.{stage.name}.{field}=0 to use the CPU"
            )


def _run_value(stage: TrainStage, section: str, name: str, model) -> float:
    """A number from a train stage's run config, or its default."""
    return _value(stage.run, section, name, model)


def _value(config: dict, section: str, name: str, model) -> float:
    """A number from a stage's nested config (run, evaluation), or its default."""
    return (config.get(section) or {}).get(name, model.model_fields[name].default)


def _write_summary(output_dir: Path, summary: dict, start: float) -> dict:
    summary["seconds"] = time.perf_counter() - start
    partial = output_dir / (SUMMARY + ".partial")
    partial.write_text(json.dumps(summary, indent=2))
    os.replace(partial, output_dir / SUMMARY)
    return summary


def _log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


# ----- command line -----


def _fields_help() -> str:
    return fields_help("pipeline fields (set in YAML; override as key=value, a stage's as stages.<name>.field=value):",
                       describe_pipeline_fields())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylign pipeline",
        description=(
            "Run the stages of a pipeline config in order (sft, reward_model, dpo, train, evaluate, report), each in "
            "output_dir/<stage>/; finished stages are skipped. Example: raylign pipeline "
            "configs/pipelines/gpt2_hh_rlhf_tiny.yaml stages.sft.training.steps=50 --force sft"
        ),
        epilog=_fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="pipeline YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (YAML values), e.g. seed=1 stages.rm.training.steps=20")
    parser.add_argument(
        "--force", nargs="*", metavar="STAGE",
        help="re-run finished stages: every stage when no name follows, else the named ones and the stages using their artefacts",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="validate the config (every stage, its references and nested run/evaluation configs) and list the stages; "
             "runs nothing and downloads nothing",
    )
    return parser


def describe_stages(config: PipelineConfig) -> list[str]:
    """One line per stage: name, kind, seeds and the stages it uses."""
    lines = []
    for stage in config.stages:
        uses = sorted({name for _, value in stage.reference_fields() for name in REFERENCE.findall(value)})
        seeds = ""
        if isinstance(stage, TrainStage):
            seeds = f" seeds {stage.run.get('seeds') or config.seeds or [stage.run.get('seed', config.seed)]}"
        parts = [f"{stage.name:<16} {stage.kind:<12}", seeds.strip(), f"uses {', '.join(uses)}" if uses else ""]
        lines.append(" ".join(part for part in parts if part))
    return lines


def pipeline_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides)
    force: bool | list[str] = False
    if args.force is not None:
        # `--force sft seed=1` hands the override to --force as well; give it back.
        overrides += [item for item in args.force if "=" in item]
        names = [item for item in args.force if "=" not in item]
        force = names or True
    try:
        config = load_pipeline_config(args.config, overrides)
        stages_to_rerun(config, force)
    except ConfigError as error:
        print(f"raylign: {error}", file=sys.stderr)
        return 2
    if args.check:
        print("\n".join(describe_stages(config)))
        print(f"{args.config}: valid, {len(config.stages)} stages")
        return 0
    try:
        summary = run_pipeline(config, force)
    except ConfigError as error:
        print(f"raylign: {error}", file=sys.stderr)
        return 2
    except PipelineError as error:
        print(f"raylign: {error}\n(see {Path(config.output_dir) / SUMMARY})", file=sys.stderr)
        return 1
    for row in summary["stages"]:
        metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row["metrics"].items())
        print(f"{row['name']:<16} {row['kind']:<13} {row['status']:<8} {row['seconds'] or 0:8.1f} s  {metrics}")
    print(f"done in {summary['seconds']:.1f} s; outputs in {summary['output_dir']} ({SUMMARY})")
    return 0


if __name__ == "__main__":
    sys.exit(pipeline_main())
