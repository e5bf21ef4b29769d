"""`raylign bench train`: seconds per training step through raylign's modes and, side by side on the same
workload, TRL's GRPOTrainer (the optional `[bench]` extra).

One workload = one model, the same prompts, 8 prompts x K=4 samples, at most `max_new_tokens` new tokens,
LoRA r8 on all linear layers, GRPO with a k3 KL term (beta 0.04, TRL's former default), no warm start and no
evaluation. Each run is a fresh `raylign train` (or a TRL trainer in its own process); the first
`warmup_steps` steps are left out and the rest summarised by medians. Benchmarks, not tests: the numbers
go to JSON (benchmarks/) and the README.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raylign.common.config import load_config

MODES = {
    # name: overrides on top of the workload's
    "raylign_vllm": ["rollout.backend=vllm"],
    "raylign_hf": ["rollout.backend=hf"],
    # The transformers engine without LoRA layers: each step's adapter merged into the rollout actor's base copy.
    "raylign_hf_merged": ["rollout.backend=hf", "rollout.weight_sync=merged"],
    # vLLM without LoRA, the merged weights reloaded in place each step: no LoRA kernels in generation.
    "raylign_vllm_merged": ["rollout.backend=vllm", "rollout.weight_sync=merged"],
    "raylign_vllm_merged_staleness1_split": ["rollout.backend=vllm", "rollout.weight_sync=merged",
                                             "rollout.max_staleness=1", "algorithm.importance_sampling_cap=2.0",
                                             "cluster.placement=split"],
    "raylign_vllm_staleness1_split": ["rollout.backend=vllm", "rollout.max_staleness=1",
                                      "algorithm.importance_sampling_cap=2.0", "cluster.placement=split"],
    # Colocated, one step stale: generation of step t+1 and learning of step t share all the cores at once.
    "raylign_vllm_staleness1": ["rollout.backend=vllm", "rollout.max_staleness=1", "algorithm.importance_sampling_cap=2.0"],
    "raylign_hf_staleness1": ["rollout.backend=hf", "rollout.max_staleness=1", "algorithm.importance_sampling_cap=2.0"],
}
# A ~86M-parameter Llama of the tiny model's family: random weights, the time per step is the figure.
LARGE_LLAMA = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
               "num_key_value_heads": 12}


def workload_overrides(model_path: str, steps: int, max_new_tokens: int, output_dir: Path,
                       dtype: str = "float32") -> list[str]:
    return [
        f"model.path={model_path}", f"model.dtype={dtype}", "model.lora.r=8", "model.lora.alpha=16",
        "model.lora.target_modules=all-linear",
        "sft.steps=0", "eval.every=0", "eval.run_test=false", "logging.progress=false", "algorithm.name=grpo",
        "algorithm.kl_coef=0.04", "algorithm.kl_estimator=k3", "train.prompts_per_step=8",
        "rollout.samples_per_prompt=4", f"rollout.max_new_tokens={max_new_tokens}", f"train.steps={steps}",
        f"output_dir={output_dir}",
    ]


def build_large_model(tiny_dir: str, output_dir: Path) -> str:
    """The tiny model's tokenizer and architecture, scaled up to LARGE_LLAMA (random weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_dir)
    for key, value in LARGE_LLAMA.items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(output_dir)
    return str(output_dir)


def summarise_raylign(metrics: list[dict], warmup_steps: int) -> dict:
    measured = metrics[warmup_steps:]

    def median(key: str) -> float | None:
        values = [m[key] for m in measured if key in m]
        return statistics.median(values) if values else None

    step_s = median("time/step_s")
    # Each step's own remainder, then the median: a difference of the phases' medians mixes different steps
    # (on the tiny workload it read 11.2 % where the steps' own remainders had a median of 7.7 %).
    overheads = [m["time/step_s"] - sum(m.get(key, 0.0) for key in ("time/generate_s", "time/reward_s",
                                                                    "time/learner_compute_s")) for m in measured]
    tokens = statistics.median(m["response_length_mean"] * 32 for m in measured)
    summary = {
        "steps_measured": len(measured),
        "step_s": step_s,
        "generate_s": median("time/generate_s"),
        "reward_s": median("time/reward_s"),
        "learner_compute_s": median("time/learner_compute_s"),
        "learn_wait_s": median("time/learn_s"),
        "publish_s": median("time/publish_s"),
        "tokens_per_s": tokens / step_s,
        "logprob_gap_max": max(m["rollout/logprob_gap"] for m in metrics),
        "reward_first": measured[0]["reward_mean"],
        "reward_last": measured[-1]["reward_mean"],
    }
    if metrics[-1].get("rollout/staleness", 0) == 0:
        # Phases run one after another: what is left of a step is the orchestration's own cost.
        summary["orchestration_overhead_s"] = statistics.median(overheads)
        summary["orchestration_share"] = statistics.median(o / m["time/step_s"] for o, m in zip(overheads, measured))
    return summary


def run_raylign(mode: str, model_path: str, steps: int, max_new_tokens: int, warmup_steps: int, workdir: Path,
                dtype: str) -> dict:
    from raylign.cluster.driver import train

    output_dir = workdir / mode
    config = load_config("configs/quickstart.yaml",
                         [*workload_overrides(model_path, steps, max_new_tokens, output_dir, dtype), *MODES[mode]])
    start = time.perf_counter()
    train(config)
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {"overrides": MODES[mode], "wall_s": time.perf_counter() - start, **summarise_raylign(metrics, warmup_steps)}


def run_trl(model_path: str, prompts: list[str], steps: int, max_new_tokens: int, warmup_steps: int, workdir: Path,
            dtype: str) -> dict:
    """TRL's GRPOTrainer on the same workload, in its own process (its own torch threads and imports)."""
    try:
        import trl
    except ImportError:
        return {"skipped": "trl is not installed: pip install -e '.[bench]'"}
    spec = {"model_path": model_path, "prompts": prompts, "steps": steps, "max_new_tokens": max_new_tokens,
            "output_dir": str(workdir / "trl"), "dtype": dtype}
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "trl_spec.json"
    spec_file.write_text(json.dumps(spec))
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "raylign.cluster.bench_trl", str(spec_file)],
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"the TRL run failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    steps_s = json.loads((workdir / "trl" / "step_seconds.json").read_text())
    measured = steps_s[warmup_steps:]
    return {"trl_version": trl.__version__, "wall_s": time.perf_counter() - start, "steps_measured": len(measured),
            "step_s": statistics.median(measured)}


def bench_train(steps: int, warmup_steps: int, workloads: list[str], modes: list[str], out: str,
                dtype: str = "float32") -> dict:
    from raylign.common.data import load_text_column
    from raylign.common.tiny_model import resolve_builtin_model

    workdir = Path(tempfile.mkdtemp(prefix="raylign-bench-train-"))
    tiny = resolve_builtin_model("builtin:tiny-llama", workdir / "tiny", seed=0)
    models = {"tiny": (tiny, 24), "llama_86m": (None, 24)}
    quickstart = load_config("configs/quickstart.yaml")
    prompts = load_text_column(quickstart.data.prompts, quickstart.data.prompt_field, quickstart.data.split,
                               data_dir=workdir / "data")[: steps * 8]
    result = {
        "benchmark": "train",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "workload": "GRPO, 8 prompts x K=4, LoRA r8 all-linear, beta 0.04 (k3), no SFT, no evaluation",
        "dtype": dtype, "steps": steps, "warmup_steps_left_out": warmup_steps, "workloads": {},
    }
    for name in workloads:
        model_path, max_new_tokens = models[name]
        if model_path is None:
            model_path = build_large_model(tiny, workdir / name)
        entry = {"model_path": model_path, "max_new_tokens": max_new_tokens, "modes": {}}
        # TRL runs before and after raylign's modes, and the ratios use the mean of its two step times (earlier
        # JSON under benchmarks/ has one run, `trl_grpo`, made after raylign's modes): a shared
        # machine's speed drifts over a run of minutes (here by up to 20 %), and this way the drift does not
        # favour whichever side ran in the faster minutes.
        entry["modes"]["trl_grpo_before"] = run_trl(model_path, prompts, steps, max_new_tokens, warmup_steps,
                                                    workdir / name / "trl_before", dtype)
        for mode in modes:
            entry["modes"][mode] = run_raylign(mode, model_path, steps, max_new_tokens, warmup_steps,
                                               workdir / name, dtype)
        entry["modes"]["trl_grpo_after"] = run_trl(model_path, prompts, steps, max_new_tokens, warmup_steps,
                                                   workdir / name / "trl_after", dtype)
        trl_steps = [entry["modes"][key].get("step_s") for key in ("trl_grpo_before", "trl_grpo_after")]
        if all(trl_steps):
            entry["trl_step_s"] = statistics.fmean(trl_steps)
            entry["speedup_vs_trl"] = {mode: entry["trl_step_s"] / entry["modes"][mode]["step_s"] for mode in modes}
        result["workloads"][name] = entry
        Path(out).write_text(json.dumps(result, indent=2))  # partial results survive a later failure
    return result
