"""Pipelines: config validation and references, stage skipping and forcing, and one tiny twin end to end on Ray."""

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from raylign.cluster.pipeline import PipelineError, run_pipeline, stages_to_rerun
from raylign.common.builtin_preferences import movie_preferences, movie_sentiment
from raylign.common.config import ConfigError, RunConfig
from raylign.common.data import review_vocabulary
from raylign.common.pipeline_config import EvaluateStage, ReportStage, TrainStage, load_pipeline_config

torch.set_num_threads(1)

PIPELINES = Path(__file__).resolve().parent.parent / "configs" / "pipelines"
TWINS = sorted(PIPELINES.glob("*_tiny.yaml"))
SEED_PIPELINES = sorted(set(PIPELINES.glob("*.yaml")) - set(TWINS))


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def config_error(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as error:
        load_pipeline_config(write_config(tmp_path, text), list(overrides))
    return str(error.value)


SFT_THEN_RM = """
    output_dir: {out}
    stages:
      - name: sft
        kind: sft
        model: {{path: "builtin:tiny-llama"}}
        data: {{source: "builtin:movie-reviews"}}
      - name: rm
        kind: reward_model
        model: {{path: "{reference}"}}
        data: {{source: "builtin:movie-preferences"}}
"""


# ----- configs -----


@pytest.mark.parametrize("path", SEED_PIPELINES + TWINS, ids=lambda p: p.stem)
def test_every_shipped_pipeline_validates(path):
    config = load_pipeline_config(path)
    assert config.stages


@pytest.mark.parametrize("path", SEED_PIPELINES + TWINS, ids=lambda p: p.stem)
def test_every_shipped_pipeline_passes_check_without_running_or_downloading(path, capsys, monkeypatch):
    from raylign.cluster.pipeline import pipeline_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pipeline_main([str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"valid, {len(load_pipeline_config(path).stages)} stages")
    assert "evaluate" in out


def train_runs(config) -> dict[str, dict]:
    return {stage.name: stage.run for stage in config.stages if isinstance(stage, TrainStage)}


@pytest.mark.parametrize("path", SEED_PIPELINES + TWINS, ids=lambda p: p.stem)
def test_every_pipeline_turns_on_what_its_seed_measures(path):
    config = load_pipeline_config(path)
    runs = train_runs(config)
    for name, run in runs.items():
        assert run["eval"]["every"] > 0 and run["eval"]["run_test"], name  # validation, best checkpoint, one test
    (evaluate,) = [stage for stage in config.stages if isinstance(stage, EvaluateStage)]
    models = [model["name"] for model in evaluate.evaluation["models"]]
    assert evaluate.evaluation["data"]["split"] == "test" and evaluate.evaluation["reference"] in models
    seed = path.stem.removesuffix("_tiny")
    if seed == "gpt2_hh_rlhf":
        assert models == ["base", "sft", "ppo", "grpo", "dpo"] and evaluate.evaluation["reference"] == "sft"
    if seed == "smollm2_orca":
        assert models == ["base", "dpo", "ppo", "grpo"] and evaluate.evaluation["data"]["category_field"] == "category"
    if seed == "grpo_heuristic_twitter":
        assert evaluate.evaluation["pass_k"] == [1, 5, 10] and evaluate.evaluation["rollout"]["samples_per_prompt"] >= 10
    if seed == "gemma_ultrafeedback":
        assert len(config.seeds) == 3 and {"ppo", "grpo"} <= set(models)
        (report,) = [stage for stage in config.stages if isinstance(stage, ReportStage)]
        assert report.runs == ["ppo", "grpo"]
    if seed == "grade_imdb":
        assert len(config.seeds) >= 2 and all(run["train"]["grad_variance_every"] > 0 for run in runs.values())
        schedules = {(run["algorithm"]["tau_start"], run["algorithm"]["tau_end"]) for run in runs.values()
                     if run["algorithm"]["name"] == "grade"}
        assert len(schedules) >= 2  # the tau ablation
        (report,) = [stage for stage in config.stages if isinstance(stage, ReportStage)]
        assert set(report.runs) == set(runs)


def test_every_tiny_twin_has_its_seed_pipelines_stages_in_miniature():
    for full in SEED_PIPELINES:
        twin = load_pipeline_config(PIPELINES / f"{full.stem}_tiny.yaml")
        # A twin may add an SFT stage (its tiny model starts random) but drops none.
        assert {(s.name, s.kind) for s in load_pipeline_config(full).stages} <= {(s.name, s.kind) for s in twin.stages}


def test_pipeline_seeds_run_every_train_stage_per_seed_unless_the_stage_names_its_own(tmp_path):
    config = load_pipeline_config(write_config(tmp_path, """
        output_dir: {out}
        seed: 7
        seeds: [1, 2]
        stages:
          - {{name: a, kind: train, run: {{model: {{path: "builtin:tiny-llama"}}}}}}
          - {{name: b, kind: train, run: {{model: {{path: "builtin:tiny-llama"}}, seeds: [5]}}}}
    """.format(out=tmp_path)))
    a, b = (stage.run_config(str(tmp_path / stage.name), config.seed, config.cluster, {}, config.seeds) for stage in config.stages)
    assert (a.seeds, b.seeds) == ([1, 2], [5])


def test_a_report_stage_compares_train_stages_only(tmp_path):
    text = SFT_THEN_RM.format(out=tmp_path, reference="{sft}") + """
      - {name: report, kind: report, runs: [sft]}
    """
    assert "stages.report.runs: 'sft' is a sft stage; a report compares train stages" in config_error(tmp_path, text)
    text = SFT_THEN_RM.format(out=tmp_path, reference="{sft}") + """
      - {name: report, kind: report, runs: [later]}
    """
    assert "refers to stage 'later', which does not exist" in config_error(tmp_path, text)


def test_an_evaluate_stage_is_validated_naming_the_stage_and_waits_for_its_references(tmp_path):
    text = SFT_THEN_RM.format(out=tmp_path, reference="{sft}") + """
      - name: evaluate
        kind: evaluate
        evaluation:
          models: [{name: sft, path: "{sft}"}, {name: rm, path: "{rm}/base_model"}]
          reference: base
    """
    message = config_error(tmp_path, text)
    assert "stages.evaluate.evaluation: reference = 'base' is not one of the models (sft, rm)" in message
    assert "base_model" not in message  # an artefact that does not exist yet is checked when its stage has run
    config = load_pipeline_config(write_config(tmp_path, text.replace("reference: base", "reference: sft")))
    assert config.dependents({"rm"}) == {"rm", "evaluate"}


def test_every_seed_pipeline_has_a_tiny_twin():
    assert len(SEED_PIPELINES) == 5
    assert {p.stem + "_tiny" for p in SEED_PIPELINES} == {p.stem for p in TWINS}


@pytest.mark.parametrize("path", TWINS, ids=lambda p: p.stem)
def test_tiny_twins_are_offline_and_their_train_stages_are_run_configs(path, tmp_path):
    config = load_pipeline_config(path)
    artefacts = {}
    for stage in config.stages:
        if isinstance(stage, TrainStage):
            run = stage.run_config(str(tmp_path / stage.name), config.seed, config.cluster, artefacts)
            assert isinstance(run, RunConfig)
            assert run.algorithm.name in ("grpo", "ppo", "reinforce", "rloo", "grade", "grade_ste")
            assert run.rollout.backend == "hf" and run.train.steps <= 3
            assert run.model.path.startswith(str(tmp_path))
        elif isinstance(stage, EvaluateStage):
            evaluation = stage.evaluate_config(str(tmp_path / stage.name), config.seed, config.cluster, artefacts)
            assert evaluation.rollout.backend == "hf"
            assert all(model.path.startswith(str(tmp_path)) for model in evaluation.models)
        elif isinstance(stage, ReportStage):
            assert all(isinstance(config.stage(name), TrainStage) for name in stage.runs)
        else:
            assert stage.model.path.startswith(("builtin:", "{"))
            assert stage.data.source.startswith("builtin:")
        # Stand-in artefacts, so the next stages' existence and tokenizer checks pass.
        artefacts[stage.name] = str(tmp_path / stage.name)
        for model_dir in (Path(artefacts[stage.name]), Path(artefacts[stage.name]) / "base_model"):
            model_dir.mkdir()
            (model_dir / "tokenizer_config.json").write_text("{}")


def test_unknown_stage_reference_names_field_value_and_the_stages_available(tmp_path):
    message = config_error(tmp_path, SFT_THEN_RM.format(out=tmp_path, reference="{sfft}"))
    assert "stages.rm.model.path = '{sfft}' refers to stage 'sfft', which does not exist" in message
    assert "earlier stages: '{sft}'" in message


def test_reference_to_a_later_stage_is_refused(tmp_path):
    text = SFT_THEN_RM.format(out=tmp_path, reference="builtin:tiny-llama").replace(
        'source: "builtin:movie-reviews"', 'source: "{rm}/prompts.jsonl"')
    message = config_error(tmp_path, text)
    assert "stages.sft.data.source = '{rm}/prompts.jsonl' refers to stage 'rm', which runs later" in message


def test_unknown_stage_kind_is_refused_with_the_choices(tmp_path):
    message = config_error(tmp_path, SFT_THEN_RM.format(out=tmp_path, reference="{sft}").replace("kind: reward_model", "kind: rlhf"))
    assert "stages.rm.kind = 'rlhf' is not a stage kind; choose one of sft, reward_model, dpo, train" in message


def test_field_errors_name_the_stage_and_unquoted_references_still_resolve(tmp_path):
    text = SFT_THEN_RM.format(out=tmp_path, reference="{sft}").replace('"{sft}"', "{sft}")
    config = load_pipeline_config(write_config(tmp_path, text))
    assert config.stage("rm").model.path == "{sft}"
    message = config_error(tmp_path, text, ["stages.rm.training.steps=0", "stages.sft.tyop=1"])
    assert "stages.rm.training.steps = 0: Input should be greater than or equal to 1" in message
    assert "stages.sft.tyop: unknown key" in message
    assert "no such stage" not in config_error(tmp_path, text, ["stages.nope.training.steps=3"])
    assert "one of the stages sft, rm" in config_error(tmp_path, text, ["stages.nope.training.steps=3"])


def test_train_stage_is_validated_as_a_run_config_naming_the_stage(tmp_path):
    text = """
        output_dir: {out}
        stages:
          - name: grpo
            kind: train
            run:
              model: {{path: "builtin:tiny-llama"}}
              rollout: {{samples_per_prompt: 1}}
    """.format(out=tmp_path)
    message = config_error(tmp_path, text)
    assert "stages.grpo.run: rollout.samples_per_prompt = 1: GRPO compares samples within a group" in message
    assert "stages.grpo.run.output_dir is set by the pipeline" in config_error(
        tmp_path, text.replace("rollout: {samples_per_prompt: 1}", "output_dir: elsewhere"))


def test_dpo_without_lora_and_split_names_outside_fractions_are_refused(tmp_path):
    text = SFT_THEN_RM.format(out=tmp_path, reference="{sft}").replace("kind: reward_model", "kind: dpo")
    assert "stages.rm.model.lora is required for DPO" in config_error(tmp_path, text)
    assert "stages.rm.data.train_split = 'policy' is not a split of data.fractions (train, eval)" in config_error(
        tmp_path, SFT_THEN_RM.format(out=tmp_path, reference="{sft}"), ["stages.rm.data.train_split=policy"])


# ----- built-in data -----


def test_builtin_preferences_are_deterministic_and_separable_by_sentiment():
    rows = movie_preferences(200)
    assert rows[:50] == movie_preferences(50)
    vocabulary = review_vocabulary()
    positive, negative = set(vocabulary["positive"]), set(vocabulary["negative"])
    for row in rows:
        chosen, rejected = set(row.chosen.lower().strip(".").replace(".", "").split()), set(row.rejected.lower().replace(".", "").split())
        assert chosen & positive and not chosen & negative
        assert rejected & negative and not rejected & positive
    labels = [row.label for row in movie_sentiment(400)]
    assert 0.4 < sum(labels) / len(labels) < 0.6


# ----- skipping and forcing -----


def test_forcing_a_stage_reruns_it_and_every_stage_using_its_artefact():
    config = load_pipeline_config(PIPELINES / "gpt2_hh_rlhf_tiny.yaml")
    assert stages_to_rerun(config, ["rm"]) == {"rm", "ppo", "grpo", "evaluate"}
    assert stages_to_rerun(config, ["dpo"]) == {"dpo", "evaluate"}
    assert stages_to_rerun(config, ["sft"]) == {"sft", "rm", "ppo", "grpo", "dpo", "evaluate"}
    assert stages_to_rerun(config, True) == {"sft", "rm", "ppo", "grpo", "dpo", "evaluate"}
    assert stages_to_rerun(config, False) == set()
    with pytest.raises(ConfigError, match="--force rn: no such stage; the stages are sft, rm, ppo, grpo, dpo, evaluate"):
        stages_to_rerun(config, ["rn"])


def test_finished_stages_are_skipped_and_their_artefacts_passed_on(tmp_path):
    config = load_pipeline_config(write_config(tmp_path, SFT_THEN_RM.format(out=tmp_path / "out", reference="{sft}")))
    for name, metrics in (("sft", {"eval/loss": 1.5}), ("rm", {"val/accuracy": 0.75})):
        (tmp_path / "out" / name).mkdir(parents=True)
        results = {"artefact": str(tmp_path / "out" / name), "seconds": 2.0, **metrics}
        (tmp_path / "out" / name / "results.json").write_text(json.dumps(results))

    summary = run_pipeline(config)

    assert [row["status"] for row in summary["stages"]] == ["skipped", "skipped"]
    assert summary["stages"][1]["metrics"] == {"val/accuracy": 0.75}
    assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["stages"][0]["artefact"] == str(tmp_path / "out" / "sft")


def test_a_stage_directory_not_written_by_a_pipeline_is_left_alone(tmp_path):
    config = load_pipeline_config(write_config(tmp_path, SFT_THEN_RM.format(out=tmp_path / "out", reference="{sft}")))
    (tmp_path / "out" / "sft").mkdir(parents=True)
    (tmp_path / "out" / "sft" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="stage 'sft' \\(sft\\) failed: .*was not written by a pipeline stage"):
        run_pipeline(config)
    assert (tmp_path / "out" / "sft" / "notes.txt").read_text() == "mine"


# ----- on Ray -----


@pytest.mark.slow
def test_failing_stage_raises_naming_the_stage_and_the_cause(ray_session, tmp_path):
    text = SFT_THEN_RM.format(out=tmp_path / "out", reference="{sft}").replace(
        'source: "builtin:movie-reviews"', f'source: "{tmp_path}/missing.jsonl"')
    config = load_pipeline_config(write_config(tmp_path, text))
    with pytest.raises(PipelineError, match=r"stage 'sft' \(sft\) failed: ValueError: data file .*missing.jsonl' does not exist"):
        run_pipeline(config)
    summary = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert [row["status"] for row in summary["stages"]] == ["failed", "pending"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_gpt2_hh_rlhf_twin_runs_end_to_end_and_skips_finished_stages_on_rerun(ray_session, tmp_path):
    from raylign.common.reward_models import load_reward_model

    config = load_pipeline_config(PIPELINES / "gpt2_hh_rlhf_tiny.yaml", [f"output_dir={tmp_path}", "stages.sft.training.steps=80"])
    summary = run_pipeline(config)

    rows = {row["name"]: row for row in summary["stages"]}
    assert [row["status"] for row in summary["stages"]] == ["done"] * 6
    assert all(row["artefact"] and row["seconds"] > 0 for row in rows.values())
    assert json.loads((tmp_path / "pipeline.json").read_text())["stages"] == summary["stages"]

    sft = json.loads((tmp_path / "sft" / "results.json").read_text())
    assert (tmp_path / "sft" / "model.safetensors").is_file()
    # The offline stages' actors wrote their output to the stage's logs/, not the console.
    assert all((tmp_path / name / "logs" / "offline.log").is_file() for name in ("sft", "rm", "dpo"))
    assert len(read_jsonl(tmp_path / "sft" / "metrics.jsonl")) == 80
    assert sft["eval/loss"] < sft["eval/loss_before"] - 2.0
    assert sft["eval/perplexity"] == pytest.approx(2.718281828 ** sft["eval/loss"], rel=1e-6)

    rm = json.loads((tmp_path / "rm" / "results.json").read_text())
    assert rm["val/accuracy"] > 0.9 and rm["num_mistakes"] == len(read_jsonl(tmp_path / "rm" / "reward_model_mistakes.jsonl"))
    reward_model = load_reward_model(rows["rm"]["artefact"], "scalar")
    good, bad = reward_model.score_prompt_completions(["Honestly, the movie was"] * 2, ["wonderful and fun.", "awful and dull."])
    assert good > bad
    prompt_rows = read_jsonl(tmp_path / "rm" / "prompts.jsonl")
    assert {row["split"] for row in prompt_rows} == {"rm", "policy", "val", "test"}
    test_prompts = [row["prompt"] for row in prompt_rows if row["split"] == "test"]

    for name in ("ppo", "grpo"):
        metrics = read_jsonl(tmp_path / name / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [0, 1]
        assert (Path(rows[name]["artefact"]) / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / name / "results.json").read_text())["steps"] == 2
        run = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert run["output_dir"] == str(tmp_path / name)
        assert run["model"]["path"] == rows["sft"]["artefact"]
        assert run["reward"]["sources"][0]["path"] == rows["rm"]["artefact"]
        assert run["data"]["prompts"] == f"{rows['rm']['artefact']}/prompts.jsonl"

    dpo = json.loads((tmp_path / "dpo" / "results.json").read_text())
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(read_jsonl(tmp_path / "dpo" / "metrics.jsonl")[0])
    assert dpo["rewards/margins"] > 0 and dpo["eval/rewards/margins"] > 0 and dpo["eval/rewards/accuracies"] > 0.9

    # The seed's table: one row per model on the held-out test prompts, the same prompts for every model.
    evaluation = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())
    assert list(evaluation["models"]) == ["base", "sft", "ppo", "grpo", "dpo"]
    assert (evaluation["prompts"]["split"], evaluation["prompts"]["count"]) == ("test", 12)
    markdown = (tmp_path / "evaluate" / "evaluation.md").read_text()
    table = markdown.split("## Results")[1].split("\n\n")[1].splitlines()
    assert table[0].startswith("| model | seeds | reward mean | reward std | KL vs sft |") and "| length |" in table[0]
    assert [row.split(" | ")[0] for row in table[2:]] == ["| base", "| sft", "| ppo", "| grpo", "| dpo"]
    assert "total_samples" in markdown.split("## Setup")[0]  # PPO's budget against GRPO's, allowed and listed first
    for name, model in evaluation["models"].items():
        samples = read_jsonl(tmp_path / "evaluate" / f"{name}_samples.jsonl")
        assert len(samples) == 12 * 2 and {s["prompt"] for s in samples} == set(test_prompts[:12])
        metrics = model["runs"][0]["metrics"]
        assert metrics["logprob_gap"] < 1e-4  # the engine sampled the model that was scored
        assert metrics["reward_mean"] == pytest.approx(sum(s["reward"] for s in samples) / len(samples))
        assert metrics["kl"] == pytest.approx(sum(s["kl"] for s in samples) / len(samples))
    assert evaluation["models"]["sft"]["runs"][0]["metrics"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert evaluation["models"]["ppo"]["runs"][0]["adapter"] == f"{rows['ppo']['artefact']}/adapter"
    assert evaluation["models"]["dpo"]["runs"][0]["adapter"] == rows["dpo"]["artefact"]
    for name in ("ppo", "grpo"):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["test/prompts"] == 8 and (tmp_path / name / "checkpoints" / "best" / "adapter").is_dir()
        assert {s["prompt"] for s in read_jsonl(tmp_path / name / "test_samples.jsonl")} <= set(test_prompts)

    again = run_pipeline(config)
    assert [row["status"] for row in again["stages"]] == ["skipped"] * 6
    assert [row["artefact"] for row in again["stages"]] == [row["artefact"] for row in summary["stages"]]


@pytest.mark.slow
def test_gemma_twin_runs_both_methods_at_three_seeds_on_one_sft_model_and_one_reward_model(ray_session, tmp_path):
    config = load_pipeline_config(PIPELINES / "gemma_ultrafeedback_tiny.yaml", [f"output_dir={tmp_path}", *SHORT_SFT])
    summary = run_pipeline(config)
    rows = {row["name"]: row for row in summary["stages"]}
    assert [row["status"] for row in summary["stages"]] == ["done"] * 6
    seeds = [42, 123, 777]
    for name in ("ppo", "grpo"):
        assert rows[name]["artefact"] == str(tmp_path / name)
        assert json.loads((tmp_path / name / "results.json").read_text())["seeds"] == seeds
        for seed in seeds:
            run = yaml.safe_load((tmp_path / name / f"seed_{seed}" / "config.yaml").read_text())
            # every seed starts from the one SFT model and scores with the one (frozen) reward model
            assert (run["seed"], run["model"]["path"], run["reward"]["sources"][0]["path"]) == (
                seed, rows["sft"]["artefact"], rows["rm"]["artefact"])
            assert len(read_jsonl(tmp_path / name / f"seed_{seed}" / "metrics.jsonl")) == 2
    # SFT and RM ran once: one model directory each, no seed directories
    assert not list((tmp_path / "sft").glob("seed_*")) and not list((tmp_path / "rm").glob("seed_*"))

    evaluation = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())
    assert {name: m["seeds"] for name, m in evaluation["models"].items()} == {"sft": None, "ppo": seeds, "grpo": seeds}
    (pair,) = evaluation["pairwise"]
    per_seed = {name: [run["metrics"]["reward_mean"] for run in evaluation["models"][name]["runs"]] for name in ("ppo", "grpo")}
    from raylign.common.statistics import cohens_d

    assert (pair["a"], pair["b"]) == ("ppo", "grpo") and pair["cohens_d"] == pytest.approx(cohens_d(per_seed["ppo"], per_seed["grpo"]))
    assert "| ppo vs grpo |" in (tmp_path / "evaluate" / "evaluation.md").read_text()
    comparison = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert {m: c["seeds"] for m, c in comparison["methods"].items()} == {"ppo": seeds, "grpo": seeds}
    assert comparison["pairwise"][0]["cohens_d"] is not None
    assert "Cohen's d" in (tmp_path / "report" / "report.md").read_text()


# The twins run their stages for the mechanics; a short SFT (40 steps, not 150) is enough for that and the
# gpt2 twin's test checks what SFT learns. The GRADE twin at one of its seeds: the report's tests across
# seeds are covered in tests/test_report.py.
SHORT_SFT = ["stages.sft.training.steps=40"]
TWIN_OVERRIDES = {"grade_imdb_tiny": ["seeds=[42]", *SHORT_SFT], "grpo_heuristic_twitter_tiny": SHORT_SFT,
                  "smollm2_orca_tiny": SHORT_SFT}


@pytest.mark.slow
@pytest.mark.parametrize("twin", [p.stem for p in TWINS if p.stem not in ("gpt2_hh_rlhf_tiny", "gemma_ultrafeedback_tiny")])
def test_every_other_tiny_twin_runs_end_to_end(twin, ray_session, tmp_path):
    config = load_pipeline_config(PIPELINES / f"{twin}.yaml", [f"output_dir={tmp_path}", *TWIN_OVERRIDES.get(twin, [])])
    summary = run_pipeline(config)
    assert [row["status"] for row in summary["stages"]] == ["done"] * len(config.stages)
    for stage in config.stages:
        results = json.loads((tmp_path / stage.name / "results.json").read_text())
        if stage.kind == "train":
            for run in sorted((tmp_path / stage.name).glob("seed_*")) or [tmp_path / stage.name]:
                metrics = read_jsonl(run / "metrics.jsonl")
                assert len(metrics) == json.loads((run / "results.json").read_text())["steps"] > 0
                assert all(math.isfinite(m["loss"]) for m in metrics)
        if stage.kind == "evaluate":
            assert (tmp_path / stage.name / "evaluation.md").is_file() and results["key_metrics"]
    if twin == "smollm2_orca_tiny":
        # The seed's comparison: reward per prompt category and its three plots.
        evaluation = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())
        categories = evaluation["prompts"]["categories"]
        assert len(categories) >= 2 and list(evaluation["models"]) == ["base", "dpo", "ppo", "grpo"]
        markdown = (tmp_path / "evaluate" / "evaluation.md").read_text()
        assert "## Reward per prompt category\n\n| model | " + " | ".join(categories) + " |" in markdown
        for name in ("reward_by_model.png", "per_category.png", "length_vs_reward.png"):
            assert name in evaluation["plots"] and (tmp_path / "evaluate" / name).stat().st_size > 10_000
    if twin == "grpo_heuristic_twitter_tiny":
        metrics = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())["models"]["grpo"]["runs"][0]["metrics"]
        assert {"pass@1", "pass@5", "pass@10", "self_bleu"} <= set(metrics)
        assert metrics["pass@1"] <= metrics["pass@5"] <= metrics["pass@10"]
    if twin == "grade_imdb_tiny":
        comparison = json.loads((tmp_path / "report" / "comparison.json").read_text())
        assert {row["tau_start"] for row in comparison["tau_ablation"]} == {1.0, 2.0}
        assert {p["grade"] for p in comparison["gradient_variance"]["pairs"]} == {"grade", "grade_tau1", "grade_ste"}
        assert read_jsonl(tmp_path / "grade" / "seed_42" / "gradient_variance.jsonl")
