"""`raylign bench rollout` (and `train`, in bench_train.py; `staleness`, in bench_staleness.py): rollout throughput, adapter publish latency, share of a step spent in sync.

Benchmarks, not tests: the numbers go to a JSON file and the README.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from raylign.cluster.bench_train import MODES, bench_train
from raylign.common.config import load_config


def bench_rollout(config_path: str, overrides: list[str], worker_counts: list[int], prompts: int, rounds: int,
                  train_steps: int) -> dict:
    import os

    import ray

    from raylign.cluster.driver import make_prompt_sampler, prepare_run, resolve_model_path, train
    from raylign.cluster.prompts import PromptEncoder
    from raylign.cluster.ray_setup import start_ray
    from raylign.cluster.rollout_pool import RolloutPool
    from raylign.learner.learner_worker import LearnerWorker

    workdir = Path(tempfile.mkdtemp(prefix="raylign-bench-"))
    config = load_config(config_path, [*overrides, f"output_dir={workdir}/train", "logging.progress=false",
                                       f"rollout.num_workers={max(worker_counts)}"])
    start_ray(config)
    model_path = resolve_model_path(config, workdir)
    config, engine = prepare_run(config, model_path)
    learner = ray.remote(LearnerWorker).options(num_cpus=config.train.num_cpus).remote(
        model_path, config.model, config.train, config.algorithm, config.rollout, config.seed)
    ray.get(learner.attach_lora.remote())
    encoder = PromptEncoder(config, model_path)
    batch = make_prompt_sampler(config, encoder, workdir).next_batch(prompts, step=0)

    throughput = {}
    for count in worker_counts:
        pool = RolloutPool(config, model_path, num_workers=count, max_model_len=encoder.max_model_len())
        pool.publish(learner.publish.remote())
        pool.generate(batch)  # warm-up: first call compiles and allocates
        seconds, tokens = [], 0
        for _ in range(rounds):
            start = time.perf_counter()
            samples = pool.generate(batch)
            seconds.append(time.perf_counter() - start)
            tokens += sum(len(s.completion_ids) for s in samples)
        total = sum(seconds)
        throughput[str(count)] = {
            "tokens_per_s": tokens / total,
            "tokens_per_s_per_worker": tokens / total / count,
            "seconds_per_batch": statistics.fmean(seconds),
            "samples_per_batch": prompts * config.rollout.samples_per_prompt,
        }
        publish_ms = []
        for _ in range(rounds):
            start = time.perf_counter()
            pool.publish(learner.publish.remote())
            publish_ms.append(1000 * (time.perf_counter() - start))
        throughput[str(count)]["publish_latency_ms"] = statistics.fmean(publish_ms)
        pool.release()
    # Free the learner's CPU reservation before the training run starts its own actors.
    ray.kill(learner)

    train_config = config.model_copy(update={"train": config.train.model_copy(update={"steps": train_steps})})
    train_config.model.path = model_path
    train(train_config)
    metrics = [json.loads(line) for line in (Path(train_config.output_dir) / "metrics.jsonl").read_text().splitlines()][1:]
    step_s = statistics.fmean(m["time/step_s"] for m in metrics)
    publish_s = statistics.fmean(m["time/publish_s"] for m in metrics)
    return {
        "benchmark": "rollout",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "backend": engine.backend,
        "weight_sync": engine.weight_sync,
        "model": config.model.path,
        "prompts_per_batch": prompts,
        "samples_per_prompt": config.rollout.samples_per_prompt,
        "max_new_tokens": config.rollout.max_new_tokens,
        "throughput_by_workers": throughput,
        "training_step": {
            "steps_measured": len(metrics),
            "step_s": step_s,
            "publish_s": publish_s,
            "sync_share_of_step": publish_s / step_s,
            "generate_s": statistics.fmean(m["time/generate_s"] for m in metrics),
            "learn_s": statistics.fmean(m["time/learn_s"] for m in metrics),
        },
    }


def bench_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raylign bench", description="Benchmarks that write JSON.")
    commands = parser.add_subparsers(dest="benchmark", required=True)
    rollout = commands.add_parser("rollout", help="rollout tokens/s with 1 and 2 workers, publish latency, sync share of a step")
    rollout.add_argument("--config", default="configs/quickstart.yaml", help="run config to take model and sampling from")
    rollout.add_argument("--out", default="bench_rollout.json", help="JSON file to write")
    rollout.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    rollout.add_argument("--prompts", type=int, default=16, help="prompts per generate call")
    rollout.add_argument("--rounds", type=int, default=5, help="timed generate calls and publishes per worker count")
    rollout.add_argument("--train-steps", type=int, default=11, help="training steps for the sync-share measurement")
    rollout.add_argument("overrides", nargs="*", help="config overrides, section.field=value")
    training = commands.add_parser("train", help="seconds per step of raylign's modes and of TRL's GRPOTrainer, side by side")
    training.add_argument("--out", default="bench_train.json", help="JSON file to write")
    training.add_argument("--steps", type=int, default=8, help="training steps per run")
    training.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the medians")
    training.add_argument("--workloads", nargs="+", default=["tiny", "llama_86m"], choices=["tiny", "llama_86m"],
                          help="the built-in tiny Llama and/or an ~86M-parameter random Llama of the same family")
    training.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="raylign modes to run")
    training.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                          help="weights dtype of both sides: raylign's model.dtype; TRL loads the model in it and, "
                               "for bfloat16, trains under bf16 autocast (bf16=True)")
    staleness = commands.add_parser("staleness", help="the quickstart's reward curve with max_staleness 0 and 1, and s/step")
    staleness.add_argument("--out", default="bench_staleness.json", help="JSON file to write (the plot goes beside it, .png)")
    staleness.add_argument("--steps", type=int, default=100, help="training steps per run")
    staleness.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds to run at each staleness")
    staleness.add_argument("--placement", choices=["colocate", "split"], default="colocate", help="cluster.placement")
    staleness.add_argument("overrides", nargs="*", help="config overrides for every run, section.field=value")
    args = parser.parse_args(argv)
    # The JSON is written after minutes of runs (and partially after each): its folder must exist first.
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.benchmark == "staleness":
        from raylign.cluster.bench_staleness import bench_staleness

        result = bench_staleness(args.steps, args.seeds, args.placement, args.out, args.overrides)
        print(json.dumps({level: {k: v for k, v in entry.items() if k != "runs"} for level, entry in result["levels"].items()}, indent=2))
        return 0
    if args.benchmark == "train":
        result = bench_train(args.steps, args.warmup_steps, args.workloads, args.modes, args.out, args.dtype)
        print(json.dumps(result, indent=2))
        return 0
    result = bench_rollout(args.config, args.overrides, args.workers, args.prompts, args.rounds, args.train_steps)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0
