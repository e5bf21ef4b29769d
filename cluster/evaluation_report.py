"""The files of a model evaluation: evaluation.json, evaluation.md, evaluation.tex and the plots.

Plots (each skipped, and evaluation.md says why, when its inputs are absent):

- reward_by_model.png: mean reward per model; error bar = 95 % t interval across seeds for a seed-run model,
  else over the per-prompt mean rewards; dots = seeds;
- per_category.png: mean reward per prompt category and model;
- length_vs_reward.png: every sample's length against its reward, per model, with a least-squares line (its
  slope and Pearson r in the legend): verbosity bias;
- reward_vs_kl.png: mean reward against mean KL to the reference, per seed and per model, with the Pareto front.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The comparison report's figure, number and LaTeX helpers, so both reports look alike.
from raylign.cluster.report import (
    _figure, _finite_or_none, _fmt, _latex_escape, _pareto_front, comparability_section,
)


def _mean(model: dict, key: str):
    return (model["summary"].get(key) or {}).get("mean")


def _read_samples(out: Path, model: dict) -> list[dict]:
    rows = []
    for run in model["runs"]:
        path = out / run["samples_file"]
        if path.is_file():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _colours(models: dict) -> dict[str, str]:
    return {name: f"C{i % 10}" for i, name in enumerate(models)}


def _reward_interval(model: dict) -> list[float] | None:
    summary = model["summary"]["reward_mean"]
    if summary["ci95_t"]:
        return summary["ci95_t"]
    if len(model["runs"]) == 1:
        return model["runs"][0]["metrics"].get("reward_ci95_prompts")
    return None


def plot_reward_by_model(result: dict, out: Path, path: Path) -> str | None:
    models = result["models"]
    fig, (ax,) = _figure(1)
    colours = _colours(models)
    for i, (name, model) in enumerate(models.items()):
        mean = _mean(model, "reward_mean")
        ax.bar(i, mean, color=colours[name], alpha=0.6, width=0.6)
        interval = _reward_interval(model)
        if interval:
            ax.errorbar(i, mean, yerr=[[mean - interval[0]], [interval[1] - mean]], color="black", capsize=6)
        if model["seeds"]:
            values = model["summary"]["reward_mean"]["per_seed"]
            offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(i + np.asarray(offsets), values, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(models)), list(models))
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set(title=f"Mean reward on {result['prompts']['count']} {result['prompts']['split']} prompts", ylabel="reward")
    fig.savefig(path)
    return None


def plot_per_category(result: dict, out: Path, path: Path) -> str | None:
    categories = result["prompts"]["categories"]
    if not categories:
        return "the prompts have no categories (set data.category_field)"
    models = result["models"]
    fig, (ax,) = _figure(1)
    colours = _colours(models)
    width = 0.8 / len(models)
    for i, (name, model) in enumerate(models.items()):
        offset = width * (i - (len(models) - 1) / 2)
        means = [_mean(model, f"category/{c}/reward_mean") for c in categories]
        xs = [j + offset for j, m in enumerate(means) if m is not None]
        ax.bar(xs, [m for m in means if m is not None], width=width, color=colours[name], alpha=0.7, label=name)
    ax.set_xticks(range(len(categories)), categories)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set(title="Mean reward per prompt category", ylabel="reward")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return None


def length_reward_fit(lengths, rewards) -> dict | None:
    """Least-squares line reward = slope * length + intercept and Pearson r; None when either does not vary."""
    x, y = np.asarray(lengths, dtype=float), np.asarray(rewards, dtype=float)
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return {"slope": float(slope), "intercept": float(intercept), "pearson_r": float(np.corrcoef(x, y)[0, 1]), "n": int(x.size)}


def plot_length_vs_reward(result: dict, out: Path, path: Path) -> str | None:
    points = {name: [(row["num_tokens"], row["reward"]) for row in _read_samples(out, model) if row["reward"] is not None]
              for name, model in result["models"].items()}
    if not any(points.values()):
        return "no samples with a reward"
    fig, (ax,) = _figure(1)
    colours = _colours(result["models"])
    for name, pairs in points.items():
        if not pairs:
            continue
        lengths, rewards = np.array(pairs, dtype=float).T
        fit = result["models"][name].get("length_reward_fit")
        label = name if fit is None else f"{name} (slope {fit['slope']:+.3g}/token, r = {fit['pearson_r']:+.2f})"
        ax.scatter(lengths, rewards, color=colours[name], alpha=0.35, s=10, label=label)
        if fit is not None:
            xs = np.array([lengths.min(), lengths.max()])
            ax.plot(xs, fit["slope"] * xs + fit["intercept"], color=colours[name], linewidth=1.5)
    ax.set(title="Verbosity bias: completion length vs reward", xlabel="completion tokens", ylabel="reward")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return None


def plot_reward_vs_kl(result: dict, out: Path, path: Path) -> str | None:
    if result["reference"] is None:
        return "no reference model (set reference)"
    fig, (ax,) = _figure(1)
    colours = _colours(result["models"])
    means = {}
    for name, model in result["models"].items():
        pairs = [(run["metrics"]["kl"], run["metrics"]["reward_mean"]) for run in model["runs"]]
        ax.scatter(*zip(*pairs), color=colours[name], alpha=0.5, s=18)
        means[name] = (float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs])))
        ax.scatter(*means[name], color=colours[name], marker="D", s=60, edgecolor="black", label=name)
    front = _pareto_front(means)
    ax.plot([means[m][0] for m in front], [means[m][1] for m in front], color="black", linestyle=":",
            drawstyle="steps-post", label="Pareto front")
    ax.set(title=f"Reward vs KL to {result['reference']}", xlabel="KL per sequence (nats)", ylabel="mean reward")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return None


PLOTS = [
    ("reward_by_model.png", "Mean reward by model (error bar: 95% t interval across seeds, or over prompts for a "
     "single model; dots: seeds)", plot_reward_by_model),
    ("per_category.png", "Mean reward per prompt category", plot_per_category),
    ("length_vs_reward.png", "Verbosity bias: length vs reward per sample, least-squares line per model", plot_length_vs_reward),
    ("reward_vs_kl.png", "Reward vs KL to the reference: seeds (dots), models (diamonds), Pareto front", plot_reward_vs_kl),
]


# ----- tables -----


def _cell(model: dict, key: str, digits: int = 3) -> str:
    summary = model["summary"].get(key)
    if summary is None or summary["mean"] is None:
        return "n/a"
    text = _fmt(summary["mean"], digits)
    return f"{text} ± {_fmt(summary['std'], digits)}" if summary["std"] is not None else text


def _columns(result: dict) -> list[tuple[str, str, int]]:
    """(header, metric key, digits) of the main table."""
    columns = [("reward mean", "reward_mean", 3), ("reward std", "reward_std", 3)]
    if len(result["reward_sources"]) > 1:
        columns += [(f"{label} mean", f"reward/{label}_mean", 3) for label in result["reward_sources"]]
    if result["reference"] is not None:
        columns += [(f"KL vs {result['reference']}", "kl", 3), ("KL k1", "kl_k1", 3),
                    (f"{result['reference']} perplexity", "reference_perplexity", 2)]
    columns += [("length", "length_mean", 1), ("distinct-1", "distinct_1", 3), ("distinct-2", "distinct_2", 3),
                ("Self-BLEU", "self_bleu", 3)]
    columns += [(f"pass@{k}", f"pass@{k}", 3) for k in result["pass_k"]]
    return columns


def _samples_cell(model: dict) -> str:
    return ", ".join(f"`{run['samples_file']}`" for run in model["runs"])


def markdown(result: dict, plots: dict[str, str], skipped: dict[str, str]) -> str:
    prompts, sampling = result["prompts"], result["sampling"]
    lines = ["# Model evaluation", ""]
    if result["comparability"] is not None:
        lines += comparability_section(result["comparability"], "evaluation.allow_different", "evaluation.vary",
                                       "evaluation.json")
    lines += [
        "## Setup", "",
        f"- Prompts: {prompts['count']} of split `{prompts['split']}` of `{prompts['source']}`, "
        f"{prompts['samples_per_prompt']} samples each, the same prompts and per-prompt seeds for every model.",
        f"- Sampling: temperature {sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k']}, "
        f"{sampling['min_new_tokens']}–{sampling['max_new_tokens']} new tokens.",
        f"- Reward: {', '.join(result['reward_sources'])} (unnormalised); pass@k threshold {result['pass_threshold']}.",
    ]
    if result["reference"] is not None:
        lines.append(f"- KL: {result['kl_definition']}")
    lines += [f"- Uncertainty: {result['uncertainty']}.", "", "## Results", ""]
    columns = _columns(result)
    lines += ["| model | seeds | " + " | ".join(c[0] for c in columns) + " | samples |",
              "|---" * (len(columns) + 3) + "|"]
    for name, model in result["models"].items():
        seeds = ", ".join(map(str, model["seeds"])) if model["seeds"] else "–"
        cells = [_cell(model, key, digits) for _, key, digits in columns]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {_samples_cell(model)} |")
    if any(m["seeds"] for m in result["models"].values()):
        lines += ["", "A model with seeds: mean ± SD across seeds of each per-seed number."]
        lines += ["", "### Per seed", "", "| model | seed | reward mean | reward std | KL | length |", "|---|---|---|---|---|---|"]
        for name, model in result["models"].items():
            for run in model["runs"]:
                if run["seed"] is not None:
                    m = run["metrics"]
                    lines.append(f"| {name} | {run['seed']} | {_fmt(m['reward_mean'])} | {_fmt(m['reward_std'])} | "
                                 f"{_fmt(m.get('kl'))} | {_fmt(m['length_mean'], 1)} |")
    if result["pairwise"]:
        lines += ["", "## Between models, across seeds", "",
                  "| comparison | Δ mean reward | Welch t | dof | p (two-sided) | Cohen's d |", "|---|---|---|---|---|---|"]
        for pair in result["pairwise"]:
            lines.append(f"| {pair['a']} vs {pair['b']} | {_fmt(pair['mean_difference'])} | {_fmt(pair['welch_t'], 2)} | "
                         f"{_fmt(pair['dof'], 1)} | {_fmt(pair['p_value'])} | {_fmt(pair['cohens_d'], 2)} |")
        lines += ["", "Cohen's d on per-seed mean rewards: |d| > 0.8 large, < 0.2 negligible."]
    if prompts["categories"]:
        lines += ["", "## Reward per prompt category", "",
                  "| model | " + " | ".join(prompts["categories"]) + " |", "|---" * (len(prompts["categories"]) + 1) + "|"]
        for name, model in result["models"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(model, f"category/{c}/reward_mean") for c in prompts["categories"]) + " |")
    fits = {name: m["length_reward_fit"] for name, m in result["models"].items() if m.get("length_reward_fit")}
    if fits:
        lines += ["", "## Verbosity bias", "", "| model | slope (reward per token) | Pearson r | samples |", "|---|---|---|---|"]
        lines += [f"| {name} | {fit['slope']:+.4g} | {fit['pearson_r']:+.3f} | {fit['n']} |" for name, fit in fits.items()]
    judge = result["judge"]
    if judge is not None:
        lines += ["", f"## LLM judge: each model against {judge['baseline']} ({judge['model']})", "",
                  f"{judge['protocol']}; win rate = (wins + ties/2) / pairs, 95% Wilson interval.", "",
                  "| model | wins | ties | losses | win rate | 95% interval |", "|---|---|---|---|---|---|"]
        for name, entry in judge["models"].items():
            p = entry["pooled"]
            lines.append(f"| {name} | {p['wins']} | {p['ties']} | {p['losses']} | {_fmt(p['win_rate'])} | "
                         f"[{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}] |")
    lines += ["", "All numbers: `evaluation.json`; LaTeX: `evaluation.tex`.", "", "## Plots", ""]
    for name, caption in plots.items():
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    if skipped:
        lines += ["## Not plotted", ""] + [f"- `{name}`: {reason}" for name, reason in skipped.items()] + [""]
    return "\n".join(lines)


def _latex_cell(model: dict, key: str, digits: int) -> str:
    summary = model["summary"].get(key)
    if summary is None or summary["mean"] is None:
        return "--"
    text = _fmt(summary["mean"], digits)
    if summary["std"] is not None:
        text += f" \\pm {_fmt(summary['std'], digits)}"
    return f"${text}$"


def latex(result: dict) -> str:
    columns = [c for c in _columns(result) if c[1] in ("reward_mean", "reward_std", "kl", "length_mean", "distinct_2", "self_bleu")]
    lines = [
        "% requires \\usepackage{booktabs}", "\\begin{table}[t]", "\\centering",
        f"\\caption{{Evaluation on {result['prompts']['count']} {_latex_escape(result['prompts']['split'])} prompts, "
        f"{result['prompts']['samples_per_prompt']} samples each; a model with seeds: mean $\\pm$ SD across seeds.}}",
        "\\label{tab:evaluation}", "\\begin{tabular}{l" + "r" * len(columns) + "}", "\\toprule",
        "Model & " + " & ".join(_latex_escape(c[0]) for c in columns) + " \\\\", "\\midrule",
    ]
    for name, model in result["models"].items():
        lines.append(_latex_escape(name) + " & " + " & ".join(_latex_cell(model, key, d) for _, key, d in columns) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path, finished: bool = True) -> dict:
    """Add the length-reward fits, draw the plots, write evaluation.json/.md/.tex and, `finished`, results.json."""
    for model in result["models"].values():
        rows = [row for row in _read_samples(out, model) if row["reward"] is not None]
        model["length_reward_fit"] = length_reward_fit([r["num_tokens"] for r in rows], [r["reward"] for r in rows])
    plots, skipped = {}, {}
    for name, caption, plot in PLOTS:
        reason = plot(result, out, out / name)
        if reason is None:
            plots[name] = caption
        else:
            skipped[name] = reason
    result["plots"], result["skipped_plots"] = plots, skipped
    clean = _finite_or_none(result)
    (out / "evaluation.json").write_text(json.dumps(clean, indent=2) + "\n")
    (out / "evaluation.md").write_text(markdown(clean, plots, skipped))
    (out / "evaluation.tex").write_text(latex(clean))
    if not finished:
        return clean
    # results.json marks a pipeline stage done; its key metrics go to pipeline.json.
    (out / "results.json").write_text(json.dumps({"artefact": clean["artefact"], "seconds": clean.get("seconds"),
                                                   "key_metrics": clean["key_metrics"]}, indent=2) + "\n")
    return clean
