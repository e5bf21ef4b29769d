"""`raylign` command line: train, pipeline, evaluate, bench, report, judge, tiny-model, cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raylign.common.config import ConfigError, RunStopped, describe_fields, fields_help, load_config
from raylign.common.tiny_model import FAMILIES


def _config_help() -> str:
    return fields_help("config fields (set in YAML or override as section.field=value):", describe_fields())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylign", description="Distributed actor/learner alignment on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="run a training job from a YAML config",
        description="Run SFT warm start (optional) and RL from one config. Example: raylign train configs/quickstart.yaml train.steps=50",
        epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="section.field=value overrides (YAML values)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint in output_dir (sets train.resume_from); "
                            "give it before the config: raylign train --resume CONFIG [overrides]")

    commands.add_parser("bench", help="benchmarks that write JSON (raylign bench rollout --help)", add_help=False)
    commands.add_parser("report", help="compare run directories: comparison.json, LaTeX table, plots, report.md", add_help=False)
    commands.add_parser("pipeline", help="run named stages (SFT -> RM -> RL/DPO -> evaluate -> report) from one config", add_help=False)
    commands.add_parser("evaluate", help="score models on the same held-out prompts: reward, KL, diversity, pass@k, plots", add_help=False)
    commands.add_parser("judge", help="LLM-as-judge win rate of one run's samples against another's", add_help=False)

    tiny = commands.add_parser(
        "tiny-model", help="build a tiny random twin of a real model family (and its tokenizer) offline",
        description=(
            "Build a ~0.5M-parameter random model with the family's real architecture class and module names, "
            "tied embeddings where the real model ties them, and a BPE tokenizer trained on the built-in reviews "
            "with the real tokenizer's quirks (special tokens, BOS, pad token, chat template). The same twins "
            "are model.path: builtin:tiny-<family>."
        ),
        epilog="families:\n" + "\n".join(f"  {f.name:<8} {f.architecture:<20} {f.real_model}" for f in FAMILIES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tiny.add_argument("output", help="directory to write the model and tokenizer to")
    tiny.add_argument("--like", choices=list(FAMILIES), default="llama", help="the model family to copy")
    tiny.add_argument("--seed", type=int, default=0, help="seed for the tokenizer corpus and the weights")

    cache = commands.add_parser(
        "cache", help="this node's copies of artefacts read from a storage URI: list or prune them",
        description=(
            "Every process that opens a model or file in a storage URI (s3://, gs://, file://...) downloads it "
            "once into $XDG_CACHE_HOME/raylign/storage/ (~/.cache/raylign/storage/). Nothing deletes these copies "
            "by itself: `prune` deletes those no process on this node has opened for --older-than-days."
        ),
    )
    cache.add_argument("action", choices=["list", "prune"], help="list: every copy; prune: delete the idle ones")
    cache.add_argument("--older-than-days", type=float, default=7.0,
                       help="prune copies idle this long (default 7; a copy's last use is when it was last opened)")
    cache.add_argument("--dry-run", action="store_true", help="prune: print what would be deleted, delete nothing")
    return parser


def cache_command(args: argparse.Namespace) -> int:
    from raylign.common.storage import cache_dir, prune_cache

    if args.older_than_days < 0:
        raise ConfigError(f"--older-than-days = {args.older_than_days} is negative; give 0 or more days")
    entries = prune_cache(0 if args.action == "list" else args.older_than_days * 86400,
                          dry_run=args.action == "list" or args.dry_run)
    for entry in entries:
        print(f"{entry['bytes'] / 2**20:10.1f} MiB  idle {entry['idle_days']:7.2f} d  {entry['uri'] or '(unknown source)'}  {entry['path']}")
    total = sum(entry["bytes"] for entry in entries) / 2**20
    verb = {"list": "held", "prune": "would be deleted" if args.dry_run else "deleted"}[args.action]
    print(f"{len(entries)} copies ({total:.1f} MiB) {verb} in {cache_dir()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from raylign.cluster.bench import bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["pipeline"]:
        from raylign.cluster.pipeline import pipeline_main

        return pipeline_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from raylign.cluster.model_evaluation import evaluate_main

        return evaluate_main(argv[1:])
    if argv[:1] == ["judge"]:
        from raylign.cluster.judge_cli import judge_main

        return judge_main(argv[1:])
    if argv[:1] == ["report"]:
        from raylign.cluster.report import report_main

        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "tiny-model":
        from raylign.common.tiny_model import build_tiny_model

        print(build_tiny_model(args.output, family=args.like, seed=args.seed))
        return 0
    try:
        if args.command == "cache":
            return cache_command(args)
        config = load_config(args.config, args.overrides)
        from raylign.cluster.driver import latest_checkpoint, train_each_seed

        if args.resume:
            try:
                newest = latest_checkpoint(Path(config.output_dir))
            except RuntimeError as error:
                raise ConfigError(f"--resume: {error}; run without --resume to start from step 0") from None
            config = load_config(args.config, [*args.overrides, f"train.resume_from={newest}"])

        runs = train_each_seed(config)
    except ConfigError as exc:
        print(f"raylign: {exc}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        print(f"raylign: {stop}\n(the traceback is in {stop.log_file})", file=sys.stderr)
        return 1
    for results in runs:
        print(
            f"done: {results['steps']} steps, reward {results['reward_first_10pct']:.3f} (first 10%) -> "
            f"{results['reward_last_10pct']:.3f} (last 10%); outputs in {results['output_dir']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
