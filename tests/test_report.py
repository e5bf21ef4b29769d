import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from raylign.cluster import report
from raylign.common import statistics as stats
from raylign.common.comparability import TOTAL_SAMPLES, IncomparableRuns, check_comparable, restore_pipeline_references
from raylign.common.config import config_to_yaml, load_config
from raylign.common.pipeline_config import TrainStage, load_pipeline_config

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "configs" / "pipelines"

STEPS = 20  # the last 10 % of steps is the last 2
# Per seed: final training reward F and ramp length L. reward_mean at step i is F·min(i, L)/L, so the last
# 2 steps average to F; smoothed with a trailing mean of 2, the curve is F(2i-1)/(2L) on the ramp and
# first reaches 80 % of F at i = ceil((1.6 L + 1) / 2): L 4 -> 4, L 6 -> 6, L 10 -> 9.
# The test reward (results.json) is F - 0.05.
RUNS = {
    "ppo": {1: (0.5, 4), 2: (0.6, 6), 3: (0.7, 10)},
    "grpo_k4": {1: (0.7, 4), 2: (0.9, 4), 3: (1.0, 6)},
}
STEPS_TO_80 = {"ppo": [4, 6, 9], "grpo_k4": [4, 4, 6]}
# Per prompt category the reward is the run's reward plus an offset, on the test split and in validation alike.
CATEGORIES = {"chat": 0.1, "code": -0.1, "math": 0.0}


def write_run(path: Path, method: str, seed: int, final: float, ramp: int, *, test=True, validation=True,
              samples=True, kl=True) -> Path:
    path.mkdir(parents=True)
    config = {"output_dir": str(path), "seed": seed, "algorithm": {"name": "ppo" if method == "ppo" else "grpo"}}
    if method != "ppo":
        config["method"] = method  # grpo_k4 is named by `method`, ppo by algorithm.name
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for i in range(STEPS):
        row = {"step": i, "reward_mean": final * min(i, ramp) / ramp, "reward_std": 0.3, "loss": 1.0 - 0.01 * i,
               "grad_norm": seed + (0.1 if i % 2 == 0 else -0.1), "response_length_mean": 10.0 + seed,
               "policy_version": i + 1, "time/step_s": 0.5}
        if kl:
            row["kl"] = 0.01 * seed * i
        if validation and i % 5 == 4:
            row["val/reward_mean"] = final - 0.02
            # only the last evaluation (step 19, the last 10 % of 4) reaches final - 0.02 + offset
            row |= {f"val/category/{c}/reward_mean": final - 0.02 + off + 0.01 * (i - 19)
                    for c, off in CATEGORIES.items()}
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"steps": STEPS, "reward_last_10pct": final}
    if test:
        results["test_reward"] = final - 0.05
        results |= {f"test/category/{c}/reward_mean": final - 0.05 + off for c, off in CATEGORIES.items()}
    (path / "results.json").write_text(json.dumps(results))
    if samples:
        lines = [{"step": i, "prompt": "p", "completion": "c" * n, "reward": final * n / 20, "policy_version": i,
                  "num_tokens": n} for i in range(STEPS) for n in (8, 12, 16)]
        (path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in lines))
    return path


def write_runs(root: Path, **options) -> list[Path]:
    return [write_run(root / f"{method}-s{seed}", method, seed, final, ramp, **options)
            for method, seeds in RUNS.items() for seed, (final, ramp) in seeds.items()]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_real_png(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    assert png_size(path) == size, path.name
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50, f"{path.name} looks blank"


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = tmp_path_factory.mktemp("report")
    return report.write_report(write_runs(root), out), out


EXPECTED_PNGS = {  # 100 dpi, 5 × 4 in per panel
    "learning_curves.png": (1500, 400),
    "validation_curves.png": (500, 400),
    "val_test_gap.png": (500, 400),
    "grad_norm.png": (1000, 400),
    "steps_to_threshold.png": (500, 400),
    "final_reward.png": (500, 400),
    "reward_vs_kl.png": (500, 400),
    "length_vs_reward.png": (500, 400),
    "per_category.png": (500, 400),
}


def test_report_writes_every_file_and_each_png_is_a_real_image_of_the_expected_size(full_report):
    result, out = full_report
    assert {p.name for p in out.iterdir()} == {"comparison.json", "comparison.tex", "report.md", *EXPECTED_PNGS}
    # no gradient-variance measurement and no GRADE run here; see the GRADE tests below
    assert list(result["skipped_plots"]) == ["gradient_variance.png", "tau_ablation.png"]
    assert result["gradient_variance"] is None
    for name, size in EXPECTED_PNGS.items():
        assert_real_png(out / name, size)


def test_comparison_json_matches_hand_computation(full_report):
    result, out = full_report
    assert json.loads((out / "comparison.json").read_text()) == result
    assert list(result["methods"]) == ["ppo", "grpo_k4"]
    finals = {"ppo": [0.45, 0.55, 0.65], "grpo_k4": [0.65, 0.85, 0.95]}  # test reward = F - 0.05 (every run has one)
    for method, expected in finals.items():
        m = result["methods"][method]
        assert m["seeds"] == [1, 2, 3]
        assert m["final_reward"]["per_seed"] == pytest.approx(expected, abs=1e-12)
        assert m["final_reward"]["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
        assert m["final_reward"]["std"] == pytest.approx(np.std(expected, ddof=1), abs=1e-12)
        # three seeds: the 95 % percentile bootstrap interval is the range of the seeds (see test_statistics)
        assert m["final_reward"]["ci95_bootstrap"] == pytest.approx([min(expected), max(expected)], abs=1e-12)
        half = 4.302652729911275 * np.std(expected, ddof=1) / math.sqrt(3)
        assert m["final_reward"]["ci95_t"] == pytest.approx([np.mean(expected) - half, np.mean(expected) + half], abs=1e-9)
        assert [r["train_reward_last_10pct"] for r in m["runs"]] == pytest.approx([f for f, _ in RUNS[method].values()])
        assert m["steps_to_threshold"]["per_seed"] == STEPS_TO_80[method]
        # kl = 0.01 · seed · step, last 2 steps 18 and 19
        assert m["final_kl"]["per_seed"] == pytest.approx([0.01 * s * 18.5 for s in (1, 2, 3)], abs=1e-12)
        # grad norm seed ± 0.1 alternating: mean = seed, SD over 20 steps = sqrt(20 · 0.01 / 19)
        assert m["grad_norm_mean"]["per_seed"] == pytest.approx([1, 2, 3], abs=1e-12)
        assert m["grad_norm_std"]["per_seed"] == pytest.approx([math.sqrt(0.2 / 19)] * 3, abs=1e-12)
        # validation F - 0.02 at every eval, test F - 0.05: gap 0.03
        assert m["val_test_gap"]["per_seed"] == pytest.approx([0.03] * 3, abs=1e-12)
    (pair,) = result["pairwise"]
    assert (pair["a"], pair["b"]) == ("ppo", "grpo_k4")
    # ppo: mean 0.55, var 0.01; grpo_k4: mean 0.8167, var 0.023333; se² = (0.01 + 0.023333) / 3
    se2 = (0.01 + 0.07 / 3) / 3
    assert pair["mean_difference"] == pytest.approx(0.55 - 2.45 / 3, abs=1e-12)
    assert pair["welch_t"] == pytest.approx((0.55 - 2.45 / 3) / math.sqrt(se2), abs=1e-9)
    assert pair["dof"] == pytest.approx(se2**2 / ((0.01 / 3) ** 2 / 2 + (0.07 / 9) ** 2 / 2), abs=1e-9)
    assert pair["p_value"] == pytest.approx(stats.student_t_sf_two_sided(pair["welch_t"], pair["dof"]), abs=1e-12)
    assert pair["cohens_d"] == pytest.approx((0.55 - 2.45 / 3) / math.sqrt((0.02 + 0.14 / 3) / 4), abs=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = scipy_stats.ttest_ind(finals["ppo"], finals["grpo_k4"], equal_var=False)
    assert pair["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)


def test_per_category_reward_is_the_test_reward_per_category_across_seeds(full_report):
    result, _ = full_report
    numbers = result["per_category"]
    assert (numbers["split"], numbers["categories"]) == ("test", ["chat", "code", "math"])
    assert list(numbers["methods"]) == ["ppo", "grpo_k4"]
    for method, seeds in RUNS.items():
        m = numbers["methods"][method]
        assert m["seeds"] == [1, 2, 3]
        for category, offset in CATEGORIES.items():
            expected = [final - 0.05 + offset for final, _ in seeds.values()]
            summary = m["categories"][category]
            assert summary["per_seed"] == pytest.approx(expected, abs=1e-12)
            assert summary["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
            assert summary["std"] == pytest.approx(np.std(expected, ddof=1), abs=1e-12)
            assert summary["ci95_bootstrap"] == pytest.approx([min(expected), max(expected)], abs=1e-12)


def test_per_category_falls_back_to_validation_for_every_run_when_one_lacks_test_categories(tmp_path):
    runs = write_runs(tmp_path / "runs", samples=False)
    results = json.loads((runs[0] / "results.json").read_text())
    (runs[0] / "results.json").write_text(json.dumps({k: v for k, v in results.items() if "/category/" not in k}))
    groups = report.group_runs([report.load_run(p) for p in runs])
    numbers = report.per_category(report.Comparison(groups, True, 0.8, 200, 0))
    assert numbers["split"] == "validation"
    for method, seeds in RUNS.items():
        for category, offset in CATEGORIES.items():
            expected = [final - 0.02 + offset for final, _ in seeds.values()]
            assert numbers["methods"][method]["categories"][category]["per_seed"] == pytest.approx(expected, abs=1e-12)


# GRADE runs for the τ ablation: (method, algorithm.name, τ fields written to config.yaml, seed, test reward).
# grade_ste-explicit spells out the defaults (2, 0.5, 1000) and so shares a setting with grade_ste, which omits them.
# The ppo run sets tau_start but is no GRADE run, so it stays out of the ablation.
TAU_1 = {"tau_start": 1.0, "tau_end": 0.1, "anneal_steps": 500}
GRADE_RUNS = [
    ("grade", "grade", {}, 1, 0.4),
    ("grade", "grade", {}, 2, 0.5),
    ("grade-tau1", "grade", TAU_1, 1, 0.6),
    ("grade-tau1", "grade", TAU_1, 2, 0.8),
    ("grade_ste", "grade_ste", {}, 1, 0.3),
    ("grade_ste-explicit", "grade_ste", {"tau_start": 2, "tau_end": 0.5, "anneal_steps": 1000}, 2, 0.35),
    ("grade_ste-tau1", "grade_ste", TAU_1, 1, 0.7),
    ("ppo", "ppo", {"tau_start": 3.0}, 1, 0.9),
]


def write_config_run(path: Path, config: dict, test_reward: float) -> Path:
    """A finished 10-step run with this config.yaml: the reward rises linearly to its test reward."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = [{"step": i, "reward_mean": test_reward * i / 9, "loss": 1.0 - 0.1 * i} for i in range(10)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "results.json").write_text(json.dumps({"steps": 10, "test_reward": test_reward}))
    return path


def write_grade_runs(root: Path, runs=GRADE_RUNS) -> list[Path]:
    return [write_config_run(root / f"{method}-s{seed}",
                             {"seed": seed, "method": method, "algorithm": {"name": algorithm, **tau}}, test_reward)
            for method, algorithm, tau, seed, test_reward in runs]


def test_tau_ablation_groups_grade_runs_by_temperature_schedule_and_plots_them(tmp_path):
    result = report.write_report(write_grade_runs(tmp_path / "runs"), tmp_path / "out", n_resamples=200)
    default = {"tau_start": 2.0, "tau_end": 0.5, "anneal_steps": 1000}
    expected = [  # (algorithm, setting, seeds, methods, per-seed final reward), settings ascending per algorithm
        ("grade", TAU_1, [1, 2], ["grade-tau1"], [0.6, 0.8]),
        ("grade", default, [1, 2], ["grade"], [0.4, 0.5]),
        ("grade_ste", TAU_1, [1], ["grade_ste-tau1"], [0.7]),
        ("grade_ste", default, [1, 2], ["grade_ste", "grade_ste-explicit"], [0.3, 0.35]),
    ]
    rows = result["tau_ablation"]
    assert len(rows) == len(expected)
    for row, (algorithm, setting, seeds, methods, finals) in zip(rows, expected):
        assert {k: row[k] for k in ("algorithm", *setting, "seeds", "methods")} == {
            "algorithm": algorithm, **setting, "seeds": seeds, "methods": methods}
        summary = row["final_reward"]
        assert summary["per_seed"] == pytest.approx(finals, abs=1e-12)
        assert summary["mean"] == pytest.approx(np.mean(finals), abs=1e-12)
        if len(finals) == 1:
            assert (summary["std"], summary["ci95_bootstrap"]) == (None, None)
        else:  # two seeds: SD = |a - b| / sqrt 2; the bootstrap means are a, (a + b) / 2 and b
            assert summary["std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2), abs=1e-12)
            assert summary["ci95_bootstrap"] == pytest.approx(finals, abs=1e-12)
    assert "tau_ablation.png" not in result["skipped_plots"]
    assert_real_png(tmp_path / "out" / "tau_ablation.png", (500, 400))
    assert "](tau_ablation.png)" in (tmp_path / "out" / "report.md").read_text()
    assert "no run has a reward per prompt category" in result["skipped_plots"]["per_category.png"]


def write_variance(run: Path, ratios: list[float]) -> None:
    rows = [{"step": 10 * i, "method": "x", "trace_covariance": r, "variance_ratio": r} for i, r in enumerate(ratios)]
    (run / "gradient_variance.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_hypothesis_1_compares_per_seed_gradient_variance_of_grade_and_policy_gradient_methods(tmp_path):
    # Per-seed geometric means 10, 100, 10 (GRADE) and 1000, 10000, 1000 (REINFORCE): log10 1, 2, 1 against 3, 4, 3.
    measured = {"grade": [[10, 10], [100], [1, 100]], "reinforce": [[1000], [10000], [100, 10000]]}
    runs = []
    for method, per_seed in measured.items():
        for seed, ratios in enumerate(per_seed, start=1):
            run = write_config_run(tmp_path / f"{method}-s{seed}", {"seed": seed, "algorithm": {"name": method}}, 0.5)
            write_variance(run, ratios)
            runs.append(run)
    result = report.write_report(runs, tmp_path / "out", n_resamples=200)
    variance = result["gradient_variance"]
    assert variance["methods"]["grade"]["per_seed"] == pytest.approx([10, 100, 10])
    assert variance["methods"]["reinforce"]["per_seed"] == pytest.approx([1000, 10000, 1000])
    (pair,) = variance["pairs"]
    assert (pair["grade"], pair["policy_gradient"], pair["n_grade"]) == ("grade", "reinforce", 3)
    assert pair["log10_ratio_difference"] == pytest.approx(-2.0)
    # both SDs sqrt(1/3): t = -2 / sqrt(2 (1/3) / 3), dof 4, d = -2 / sqrt(1/3)
    assert pair["welch_t"] == pytest.approx(-2 / math.sqrt(2 / 9))
    assert pair["cohens_d"] == pytest.approx(-2 / math.sqrt(1 / 3))
    assert pair["p_value"] == pytest.approx(stats.student_t_sf_two_sided(-2 / math.sqrt(2 / 9), 4.0))
    assert pair["p_value"] < 0.05 and pair["verdict"] == "supported"
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Hypothesis 1: gradient variance" in markdown and "| grade | reinforce | -2.000 |" in markdown
    assert "gradient_variance.png" in result["plots"]
    assert_real_png(tmp_path / "out" / "gradient_variance.png", (1000, 400))


def test_tau_ablation_is_skipped_with_a_single_temperature_schedule(tmp_path):
    single = [run for run in GRADE_RUNS if run[2] is not TAU_1]
    groups = report.group_runs([report.load_run(p) for p in write_grade_runs(tmp_path / "runs", single)])
    comparison = report.Comparison(groups, True, 0.8, 200, 0)
    rows = report.compare(comparison)["tau_ablation"]
    assert [(row["algorithm"], row["tau_start"], row["seeds"]) for row in rows] == [("grade", 2.0, [1, 2]),
                                                                                  ("grade_ste", 2.0, [1, 2])]
    reason = report.plot_tau_ablation(comparison, tmp_path / "tau_ablation.png")
    assert reason.endswith("found 1") and not (tmp_path / "tau_ablation.png").exists()


def test_latex_table_escapes_names_and_bolds_the_best_method(full_report):
    _, out = full_report
    tex = (out / "comparison.tex").read_text()
    assert "\\begin{tabular}" in tex and tex.count("\\toprule") == 2
    assert "grpo\\_k4 & 3 & $\\mathbf{0.817} \\pm 0.153$ & $[0.650, 0.950]$ & $4.7 \\pm 1.2$" in tex
    assert "ppo & 3 & $0.550 \\pm 0.100$ & $[0.450, 0.650]$ & $6.3 \\pm 2.5$" in tex
    assert "ppo vs grpo\\_k4 & $-0.267$ & $-2.53$ & $3.4$" in tex


def test_markdown_report_embeds_every_plot_and_the_table(full_report):
    _, out = full_report
    text = (out / "report.md").read_text()
    for name in EXPECTED_PNGS:
        assert f"]({name})" in text
    assert "| grpo_k4 | 3 | 0.817 ± 0.153 | [0.650, 0.950] |" in text
    assert "| ppo vs grpo_k4 | -0.267 | -2.53 | 3.4 |" in text


def test_absent_inputs_skip_their_plots_and_the_report_says_why(tmp_path):
    runs = write_runs(tmp_path / "runs", test=False, validation=False, samples=False, kl=False)
    result = report.write_report(runs, tmp_path / "out")
    skipped = result["skipped_plots"]
    assert set(skipped) == {"validation_curves.png", "val_test_gap.png", "reward_vs_kl.png", "tau_ablation.png",
                            "per_category.png", "gradient_variance.png"}
    assert result["per_category"] is None and result["tau_ablation"] == []
    for name, reason in skipped.items():
        assert not (tmp_path / "out" / name).exists()
        assert f"- `{name}`: {reason}" in (tmp_path / "out" / "report.md").read_text()
    # without kl the learning curves have two panels; without samples the verbosity plot has one point per seed
    assert png_size(tmp_path / "out" / "learning_curves.png") == (1000, 400)
    assert result["methods"]["ppo"]["final_reward"]["per_seed"] == pytest.approx([0.5, 0.6, 0.7])
    assert result["final_reward_definition"].startswith("mean training reward_mean")


def test_one_run_without_test_reward_puts_every_method_on_training_reward(tmp_path):
    runs = write_runs(tmp_path / "runs")
    results_path = runs[0] / "results.json"
    results_path.write_text(json.dumps({"steps": STEPS}))
    result = report.write_report(runs, tmp_path / "out")
    assert result["methods"]["grpo_k4"]["final_reward"]["per_seed"] == pytest.approx([0.7, 0.9, 1.0])
    assert str(runs[0]) in result["warning"]


def test_a_run_without_rewards_is_listed_without_numbers(tmp_path):
    runs = write_runs(tmp_path / "runs", samples=False)
    dpo = tmp_path / "runs" / "dpo"
    dpo.mkdir()
    (dpo / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "method": "dpo"}))
    (dpo / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 - 0.1 * i}) + "\n" for i in range(5)))
    result = report.write_report([*runs, dpo], tmp_path / "out", n_resamples=200)
    assert result["methods"]["dpo"]["final_reward"]["mean"] is None
    assert result["pairwise"][-1] == {"a": "grpo_k4", "b": "dpo", "n_a": 3, "n_b": 0, "mean_difference": None,
                                      "welch_t": None, "dof": None, "p_value": None, "cohens_d": None,
                                      "note": "t-test and Cohen's d need at least 2 seeds per method"}
    assert "dpo & 1 & -- & -- & -- & -- \\\\" in (tmp_path / "out" / "comparison.tex").read_text()


def test_a_folder_of_runs_is_expanded_and_a_repeated_seed_is_refused(tmp_path):
    runs = write_runs(tmp_path / "runs")
    found = report.discover_runs([tmp_path / "runs"])
    assert sorted(found) == sorted(runs)
    twin = write_run(tmp_path / "again", "ppo", 2, 0.6, 6)
    with pytest.raises(report.ReportError, match="both method 'ppo' with seed 2"):
        report.group_runs([report.load_run(p) for p in [*runs, twin]])


def test_cli_writes_the_report_and_fails_with_status_2_on_a_non_run(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs", samples=False)
    assert report.report_main([*map(str, runs), "--out", str(tmp_path / "out"), "--bootstrap-resamples", "500"]) == 0
    assert "ppo: final reward 0.550 ± 0.100 over seeds [1, 2, 3]" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["bootstrap"]["resamples"] == 500
    (tmp_path / "empty").mkdir()
    assert report.report_main([str(tmp_path / "empty"), "--out", str(tmp_path / "out2")]) == 2
    assert "no run directory here" in capsys.readouterr().err


# ----- comparability: only runs of the same experiment are compared -----


def resolved(config) -> dict:
    """What the driver writes to config.yaml: every field, defaults included."""
    return yaml.safe_load(config_to_yaml(config))


def pipeline_stage_configs(path: Path, root: Path, *overrides: str) -> dict[str, dict]:
    """Each train stage's config.yaml as `raylign pipeline` writes it into root, earlier stages' artefacts stood
    in by empty directories; root gets the pipeline.yaml a pipeline writes."""
    config = load_pipeline_config(path, [f"output_dir={root}", *overrides])
    root.mkdir(parents=True)
    (root / "pipeline.yaml").write_text(config_to_yaml(config))
    artefacts, configs = {}, {}
    for stage in config.stages:
        if isinstance(stage, TrainStage):
            configs[stage.name] = resolved(stage.run_config(str(root / stage.name), config.seed, config.cluster, artefacts))
        artefacts[stage.name] = str(root / stage.name)
        (root / stage.name).mkdir()
        (root / stage.name / "tokenizer_config.json").write_text("{}")  # a model directory holds its tokenizer
    return configs


QUICKSTART = load_config(ROOT / "configs" / "quickstart.yaml")
QUICKSTART_SAMPLES = QUICKSTART.train.steps * QUICKSTART.train.prompts_per_step * QUICKSTART.rollout.samples_per_prompt
QUICKSTART_KL = QUICKSTART.algorithm.kl_coef


@pytest.fixture
def mixed_runs(tmp_path) -> list[Path]:
    """The issue's mixed report: a PPO run of the quickstart (built-in tiny Llama, movie-review prompts, VADER;
    seed 0) and the PPO and REINFORCE stages of grade_imdb_tiny (an SFT model, IMDB prompts, a classifier RM; seed 42)."""
    quickstart = tmp_path / "quickstart-ppo"
    config = resolved(load_config(ROOT / "configs" / "quickstart.yaml", [f"output_dir={quickstart}", "algorithm.name=ppo"]))
    stages = pipeline_stage_configs(PIPELINES / "grade_imdb_tiny.yaml", tmp_path / "grade_imdb_tiny")
    return [write_config_run(quickstart, config, 0.5),
            write_config_run(tmp_path / "grade_imdb_tiny" / "ppo", stages["ppo"], 0.7),
            write_config_run(tmp_path / "grade_imdb_tiny" / "reinforce", stages["reinforce"], 0.6)]


def test_a_report_mixing_two_experiments_is_refused_naming_runs_field_values_and_flag(mixed_runs, tmp_path, capsys):
    quickstart, ppo, reinforce = map(str, mixed_runs)
    with pytest.raises(IncomparableRuns) as error:
        report.write_report(mixed_runs, tmp_path / "out")
    message = str(error.value)
    # controlled fields, across every run; the grade stages' paths read back as the pipeline's references
    assert (f'model.path: "builtin:tiny-llama" in {quickstart}; "{{sft}}" in {ppo}, {reinforce} '
            "(--allow-different model.path)") in message
    assert (f'data.prompts: "builtin:movie-reviews" in {quickstart}; "{{rm}}/prompts.jsonl" in {ppo}, {reinforce} '
            "(--allow-different data.prompts)") in message
    assert (f'reward.sources: [{{"name": "vader_sentiment", "weight": 1.0, "path": null, "label": null, "options": {{}}}}] '
            f'in {quickstart}; [{{"name": "classifier_rm", "weight": 1.0, "path": "{{rm}}", "label": null, '
            f'"options": {{}}}}] in {ppo}, {reinforce} (--allow-different reward.sources)') in message
    # the quickstart's steps × 8 prompts × 4 samples against 2 × 8 × 1
    assert (f"total_samples (train.steps × train.prompts_per_step × rollout.samples_per_prompt): {QUICKSTART_SAMPLES} in {quickstart}; "
            f"16 in {ppo}, {reinforce} (--allow-different total_samples)") in message
    # both PPO, so PPO's own settings must agree as well
    assert f"algorithm.kl_coef in method 'ppo': {QUICKSTART_KL} in {quickstart}; 0.1 in {ppo} (--vary algorithm.kl_coef)" in message
    assert "reinforce" not in message.split("Fields differ between runs of one method")[1]
    assert not (tmp_path / "out").exists()
    assert report.report_main([*map(str, mixed_runs), "--out", str(tmp_path / "out")]) == 2
    assert "raylign report: these runs did not run the same experiment." in capsys.readouterr().err


def test_the_mixed_report_with_allow_different_lists_the_differences_in_its_first_section(mixed_runs, tmp_path):
    quickstart, ppo, reinforce = map(str, mixed_runs)
    allowed = ["model", "sft", "data", "rollout", "reward.sources", "algorithm", "train", "eval", "total_samples"]
    flags = [arg for field in allowed for arg in ("--allow-different", field)]
    out = tmp_path / "out"
    assert report.report_main([*map(str, mixed_runs), "--out", str(out), "--bootstrap-resamples", "200", *flags]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["methods"]["ppo"]["seeds"] == [0, 42]
    differences = result["comparability"]["allowed_differences"]
    assert differences["model.path"] == {quickstart: "builtin:tiny-llama", ppo: "{sft}", reinforce: "{sft}"}
    assert differences["total_samples"] == {quickstart: QUICKSTART_SAMPLES, ppo: 16, reinforce: 16}
    assert differences["algorithm.kl_coef"] == {quickstart: QUICKSTART_KL, ppo: 0.1, reinforce: 0.1}
    held = result["comparability"]["held_equal"]
    assert {k: held[k] for k in ("rollout.temperature", "rollout.top_p", "rollout.top_k", "eval.test_split")} == {
        "rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.top_k": -1, "eval.test_split": "test"}
    assert set(held).isdisjoint(differences)
    first, tables = (out / "report.md").read_text().split("\n## Runs\n")
    assert first.startswith("# Method comparison\n\n## What differs between the runs\n\n"
                            "Allowed to differ (`--allow-different`)")
    assert (f'| model.path | `"builtin:tiny-llama"` | `{quickstart}` |\n'
            f'|  | `"{{sft}}"` | `{ppo}`, `{reinforce}` |') in first
    assert f"| total_samples | `{QUICKSTART_SAMPLES}` | `{quickstart}` |\n|  | `16` | `{ppo}`, `{reinforce}` |" in first
    assert "| ppo | 0, 42 |" in tables and "## Final reward" in tables


def test_seed_runs_of_one_experiment_report_that_nothing_differs(full_report):
    result, out = full_report
    comparability = result["comparability"]
    assert (comparability["allowed_differences"], comparability["varied"]) == ({}, {})
    assert comparability["held_equal"]["total_samples"] == 100 * 8 * 4  # train.steps × prompts_per_step × K defaults
    assert comparability["controlled_fields"][:3] == ["model", "sft", "data"]
    first = (out / "report.md").read_text().split("## Runs")[0]
    assert "Nothing: every run shares the controlled fields" in first


def test_a_pipelines_stages_at_two_pipeline_seeds_are_compared_without_flags(tmp_path):
    runs = []
    for seed in (42, 1):
        stages = pipeline_stage_configs(PIPELINES / "grade_imdb_tiny.yaml", tmp_path / f"seed{seed}", f"seed={seed}")
        runs += [write_config_run(tmp_path / f"seed{seed}" / name, config, 0.5) for name, config in stages.items()]
    result = report.write_report(runs, tmp_path / "out", n_resamples=200)
    assert {method: m["seeds"] for method, m in result["methods"].items()} == {
        method: [1, 42] for method in ("ppo", "reinforce", "grade", "grade_tau1", "grade_ste")}
    held = result["comparability"]["held_equal"]
    assert (held["model.path"], held["data.prompts"], held["reward.sources"][0]["path"]) == (
        "{sft}", "{rm}/prompts.jsonl", "{rm}")
    assert result["comparability"]["allowed_differences"] == {}


EQUAL_BUDGETS = {"grade_imdb", "grade_imdb_tiny", "grpo_heuristic_twitter", "grpo_heuristic_twitter_tiny"}


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_pipelines_methods_share_every_controlled_field_but_the_sample_budget(path, tmp_path):
    configs = {}
    for seed in (42, 1):
        stages = pipeline_stage_configs(path, tmp_path / f"seed{seed}", f"seed={seed}")
        configs |= {f"{name}@{seed}": restore_pipeline_references(config) for name, config in stages.items()}
    comparability = check_comparable(configs, allow_different=[TOTAL_SAMPLES])
    # PPO samples one completion per prompt, GRPO a group of K from as many prompts: K times the samples
    assert [d.field for d in comparability.allowed] == ([] if path.stem in EQUAL_BUDGETS else [TOTAL_SAMPLES])


def test_vary_lets_the_tau_schedule_differ_between_seeds_of_one_method(tmp_path):
    runs = [write_config_run(tmp_path / f"grade-s{seed}", {"seed": seed, "algorithm": {"name": "grade", "tau_start": tau}},
                             reward) for seed, tau, reward in ((1, 1.0, 0.6), (2, 2.0, 0.4), (3, 1.0, 0.8))]
    with pytest.raises(IncomparableRuns) as error:
        report.write_report(runs, tmp_path / "out")
    assert (f"algorithm.tau_start in method 'grade': 1.0 in {runs[0]}, {runs[2]}; 2.0 in {runs[1]} "
            "(--vary algorithm.tau_start)") in str(error.value)
    result = report.write_report(runs, tmp_path / "out", vary=["algorithm.tau_start"], n_resamples=200)
    assert result["comparability"]["varied"] == {"algorithm.tau_start": {str(runs[0]): 1.0, str(runs[1]): 2.0,
                                                                         str(runs[2]): 1.0}}
    assert [(row["tau_start"], row["seeds"]) for row in result["tau_ablation"]] == [(1.0, [1, 3]), (2.0, [2])]
    first = (tmp_path / "out" / "report.md").read_text().split("## Runs")[0]
    assert f"| algorithm.tau_start | `1.0` | `{runs[0]}`, `{runs[2]}` |\n|  | `2.0` | `{runs[1]}` |" in first


def test_methods_may_reach_one_sample_budget_differently_but_must_sample_alike():
    ppo = {"seed": 1, "algorithm": {"name": "ppo"}, "rollout": {"samples_per_prompt": 1}, "train": {"steps": 400}}
    grpo = {"seed": 1, "algorithm": {"name": "grpo"}, "rollout": {"samples_per_prompt": 4}, "train": {"steps": 100}}
    assert check_comparable({"ppo": ppo, "grpo": grpo}).held_equal[TOTAL_SAMPLES] == 400 * 8 * 1 == 100 * 8 * 4
    grpo["rollout"]["max_new_tokens"] = 48
    grpo["train"]["steps"] = 200
    with pytest.raises(IncomparableRuns) as error:
        check_comparable({"ppo": ppo, "grpo": grpo})
    assert "rollout.max_new_tokens: 24 in ppo; 48 in grpo (--allow-different rollout.max_new_tokens)" in str(error.value)
    assert "6400 in grpo (--allow-different total_samples)" in str(error.value)
    allowed = check_comparable({"ppo": ppo, "grpo": grpo}, allow_different=["rollout.max_new_tokens", TOTAL_SAMPLES]).allowed
    assert [(d.field, d.values) for d in allowed] == [("rollout.max_new_tokens", {"ppo": 24, "grpo": 48}),
                                                      (TOTAL_SAMPLES, {"ppo": 3200, "grpo": 6400})]


def test_a_reward_function_is_the_same_reward_as_one_source_of_weight_one():
    as_function = {"seed": 1, "reward": {"function": "vader_sentiment"}}
    as_source = {"seed": 2, "reward": {"sources": [{"name": "vader_sentiment", "weight": 1.0}]}}
    assert check_comparable({"a": as_function, "b": as_source}).held_equal["reward.sources"] == [
        {"name": "vader_sentiment", "weight": 1.0, "path": None, "label": None, "options": {}}]
    as_source["reward"]["sources"][0]["weight"] = 0.5
    with pytest.raises(IncomparableRuns, match=r'"weight": 0.5.* in b \(--allow-different reward.sources\)'):
        check_comparable({"a": as_function, "b": as_source})


def test_seeds_may_differ_in_where_and_how_they_ran():
    first = {"seed": 1, "output_dir": "outputs/a"}
    resumed_elsewhere = {"seed": 2, "output_dir": "outputs/b", "rollout": {"num_workers": 4, "num_gpus": 0.5},
                         "train": {"resume_from": "outputs/b/checkpoints/step_5", "micro_batch_size": 8},
                         "logging": {"wandb": True}, "cluster": {"address": "auto"}}
    comparability = check_comparable({"a": first, "b": resumed_elsewhere})
    assert (comparability.allowed, comparability.varied) == ([], [])


def test_a_misspelt_or_controlled_field_in_vary_is_refused_with_the_fix():
    runs = {"a": {"seed": 1}, "b": {"seed": 2}}
    with pytest.raises(IncomparableRuns, match=r"--vary algorithm.tau_strat: no run's config has this field; "
                                               r"did you mean algorithm.tau_start\?"):
        check_comparable(runs, vary=["algorithm.tau_strat"])
    with pytest.raises(IncomparableRuns, match="--vary model.path: model.path is a controlled field.*"
                                               "pass --allow-different model.path"):
        check_comparable(runs, vary=["model.path"])
