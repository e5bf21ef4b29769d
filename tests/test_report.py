import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from raylign.cluster import report
from raylign.common import statistics as stats

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
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"steps": STEPS, "reward_last_10pct": final}
    if test:
        results["test_reward"] = final - 0.05
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
}


def test_report_writes_every_file_and_each_png_is_a_real_image_of_the_expected_size(full_report):
    result, out = full_report
    assert {p.name for p in out.iterdir()} == {"comparison.json", "comparison.tex", "report.md", *EXPECTED_PNGS}
    assert result["skipped_plots"] == {}
    from PIL import Image

    for name, size in EXPECTED_PNGS.items():
        assert png_size(out / name) == size, name
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50, f"{name} looks blank"


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
    assert set(skipped) == {"validation_curves.png", "val_test_gap.png", "reward_vs_kl.png"}
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
