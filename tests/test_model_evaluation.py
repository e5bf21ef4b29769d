"""The evaluate stage: its numbers against hand-computed ones, what each model entry resolves to, the scorer,
the judge wiring and the config checks. No Ray: the end-to-end runs are in tests/test_pipeline.py."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from raylign.cluster.evaluation_report import length_reward_fit, write_outputs
from raylign.cluster.model_evaluation import (
    EvalPrompts,
    ModelInstance,
    resolve_models,
    rollout_groups,
    run_judge,
    summarise,
)
from raylign.common.eval_metrics import evaluation_metrics, self_bleu, sequence_kl
from raylign.common.evaluate_config import EvalModelConfig, EvaluateConfig
from raylign.common.types import Sample, SamplingSettings

# Two prompts x two samples; sample 3 got no reward (a failing source).
PROMPTS = ["p1", "p1", "p2", "p2"]
COMPLETIONS = ["a b", "a b c", "x", "x y"]
LENGTHS = [2, 3, 1, 2]
REWARDS = [1.0, 0.0, None, 0.6]
POLICY = [[-1.0, -2.0], [-0.5, -0.5, -1.0], [-0.1], [-1.0, -1.0]]
REFERENCE = [[-1.5, -2.0], [-0.5, -0.5, -1.0], [-1.1], [-0.5, -1.0]]
BEHAVIOUR = [[-1.0, -2.0], [-0.5, -0.5, -1.0], [-0.1], [-1.0, -1.004]]


def fixed_metrics(**overrides):
    options = dict(samples_per_prompt=2, pass_k=[1, 2], pass_threshold=0.5,
                   components={"rm": REWARDS, "brevity": [0.2, 0.3, 0.1, 0.2]}, categories={"p1": "cats", "p2": "dogs"},
                   policy_logprobs=POLICY, reference_logprobs=REFERENCE, behaviour_logprobs=BEHAVIOUR, max_new_tokens=3)
    return evaluation_metrics(PROMPTS, COMPLETIONS, LENGTHS, REWARDS, **{**options, **overrides})


def test_evaluation_metrics_match_hand_computation():
    m = fixed_metrics()
    mean = (1.0 + 0.0 + 0.6) / 3
    assert (m["prompts"], m["samples"], m["invalid_count"]) == (2, 4, 1)
    assert m["reward_mean"] == pytest.approx(mean)
    assert m["reward_std"] == pytest.approx(math.sqrt(((1 - mean) ** 2 + mean ** 2 + (0.6 - mean) ** 2) / 3))
    assert m["reward/brevity_mean"] == pytest.approx(0.2) and m["reward/rm_mean"] == pytest.approx(mean)
    # k3 per sequence, r = ref - policy: (e^-0.5 - 1 + 0.5) + 0, 0, e^-1 - 1 + 1, (e^0.5 - 1 - 0.5) + 0
    k3 = [math.exp(-0.5) - 0.5, 0.0, math.exp(-1.0), math.exp(0.5) - 1.5]
    assert m["kl"] == pytest.approx(sum(k3) / 4)
    assert m["kl_std"] == pytest.approx(math.sqrt(sum((x - sum(k3) / 4) ** 2 for x in k3) / 4))
    assert m["kl_k1"] == pytest.approx((0.5 + 0.0 + 1.0 - 0.5) / 4)
    assert m["reference_perplexity"] == pytest.approx(math.exp(8.1 / 8))
    assert m["logprob_gap"] == pytest.approx(0.004 / 8)
    assert (m["length_mean"], m["length_std"], m["truncated_fraction"]) == pytest.approx((2.0, math.sqrt(0.5), 0.25))
    # unigrams a b a b c x x y: 5 distinct of 8; bigrams (a b) (a b) (b c) (x y): 3 of 4
    assert (m["distinct_1"], m["distinct_2"]) == (5 / 8, 3 / 4)
    assert m["self_bleu"] == pytest.approx(self_bleu(COMPLETIONS))
    # pass@1: each prompt has one of two samples >= 0.5 (the invalid one fails): 1 - C(1,1)/C(2,1) = 0.5
    assert (m["pass@1"], m["pass@2"]) == (0.5, 1.0)
    assert (m["category/cats/reward_mean"], m["category/cats/samples"]) == (0.5, 2)
    assert (m["category/dogs/reward_mean"], m["category/dogs/samples"]) == (0.6, 1)


def test_sequence_kl_is_never_negative_while_k1_can_be():
    kl = sequence_kl(POLICY, REFERENCE)
    assert all(value >= 0 for value in kl["k3"]) and min(kl["k1"]) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="sequence 0: 2 policy logprobs but 1 reference"):
        sequence_kl([[-1.0, -1.0]], [[-1.0]])


def test_metrics_without_a_reference_have_no_kl_and_refuse_an_unfinished_group():
    m = fixed_metrics(reference_logprobs=None)
    assert "kl" not in m and "reference_perplexity" not in m and "logprob_gap" in m
    with pytest.raises(ValueError, match="3 samples is not a positive multiple of samples_per_prompt = 2"):
        evaluation_metrics(PROMPTS[:3], COMPLETIONS[:3], LENGTHS[:3], REWARDS[:3], samples_per_prompt=2)


def config(tmp_path, **fields) -> EvaluateConfig:
    base = {"output_dir": str(tmp_path / "eval"), "models": [{"name": "sft", "path": "builtin:tiny-gpt2"}], "reference": None,
            "rollout": {"samples_per_prompt": 2, "backend": "hf"}, "pass_k": [1, 2]}
    return EvaluateConfig.model_validate({**base, **fields})


def write_samples(out: Path, instance: ModelInstance, rewards: list[float], lengths: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / instance.samples_file).open("w") as f:
        for reward, length in zip(rewards, lengths):
            f.write(json.dumps({"prompt": "p", "num_tokens": length, "reward": reward}) + "\n")


def test_seed_summaries_and_cohens_d_across_seeds_match_hand_computation(tmp_path):
    cfg = config(tmp_path, models=[{"name": "sft", "path": "builtin:tiny-gpt2"}, {"name": "ppo", "path": "builtin:tiny-gpt2"},
                                   {"name": "grpo", "path": "builtin:tiny-gpt2"}], reference="sft")
    instances = [ModelInstance("sft", None, "b", None)] + [
        ModelInstance(name, seed, "b", "a") for name in ("ppo", "grpo") for seed in (1, 2, 3)]
    rewards = {"sft": 0.1, "ppo@seed_1": 0.5, "ppo@seed_2": 0.7, "ppo@seed_3": 0.6,
               "grpo@seed_1": 0.4, "grpo@seed_2": 0.5, "grpo@seed_3": 0.3}
    evaluated = {label: {"reward_mean": r, "reward_std": 0.1, "kl": 0.0 if label == "sft" else 2 * r, "length_mean": 10.0,
                         "reward_ci95_prompts": [r - 0.05, r + 0.05], "category/cats/reward_mean": r}
                 for label, r in rewards.items()}
    settings = SamplingSettings(samples_per_prompt=2, max_new_tokens=16)
    result = summarise(cfg, instances, evaluated, EvalPrompts(["p"], {"p": "cats"}), settings, None, None)

    ppo = result["models"]["ppo"]
    assert ppo["seeds"] == [1, 2, 3] and result["models"]["sft"]["seeds"] is None
    assert ppo["summary"]["reward_mean"]["mean"] == pytest.approx(0.6)
    assert ppo["summary"]["reward_mean"]["std"] == pytest.approx(0.1)  # sample SD across seeds
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert ppo["summary"]["reward_mean"]["ci95_t"] == pytest.approx([0.6 - half, 0.6 + half])
    (pair,) = result["pairwise"]
    assert (pair["a"], pair["b"], pair["mean_difference"]) == ("ppo", "grpo", pytest.approx(0.2))
    assert pair["cohens_d"] == pytest.approx(0.2 / 0.1)  # both SDs 0.1, so the pooled SD is 0.1

    out = Path(cfg.output_dir)
    for instance in instances:
        write_samples(out, instance, [rewards[instance.label] + d for d in (-0.1, 0.0, 0.1)], [4, 8, 12])
    written = write_outputs(result, out)
    fit = written["models"]["ppo"]["length_reward_fit"]
    # Pooled over seeds: slope 0.1 / 4 tokens; the seeds' offsets (0.5, 0.7, 0.6) add as much reward variance
    # (0.02 / 3) as the line explains (0.025^2 * 32 / 3), so r = 1 / sqrt(2).
    assert fit["slope"] == pytest.approx(0.025) and fit["pearson_r"] == pytest.approx(1 / math.sqrt(2))
    assert set(written["plots"]) == {"reward_by_model.png", "per_category.png", "length_vs_reward.png", "reward_vs_kl.png"}
    markdown = (out / "evaluation.md").read_text()
    assert "| ppo | 1, 2, 3 | 0.600 ± 0.100 | 0.100 ± 0.000 | 1.200 ± 0.200 |" in markdown
    assert "| ppo vs grpo | 0.200 |" in markdown and "| 2.00 |" in markdown
    assert "## Reward per prompt category" in markdown and "| sft | 0.100 |" in markdown
    assert "\\begin{tabular}" in (out / "evaluation.tex").read_text()
    assert json.loads((out / "results.json").read_text())["key_metrics"]["ppo/reward_mean"] == pytest.approx(0.6)


def test_length_reward_fit_is_the_least_squares_line():
    fit = length_reward_fit([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert (fit["slope"], fit["intercept"]) == pytest.approx((0.8, 0.5))
    assert fit["pearson_r"] == pytest.approx(0.8)
    assert length_reward_fit([5, 5, 5], [1.0, 2.0, 3.0]) is None


def rl_run(directory: Path, model_path: str, sft_steps: int = 0, best: bool = False, seed: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "model": {"path": model_path}, "sft": {"steps": sft_steps}}))
    for name in ["step_000002", "step_000004"] + (["best"] if best else []):
        (directory / "checkpoints" / name / "adapter").mkdir(parents=True)
        (directory / "checkpoints" / name / "driver_state.json").write_text("{}")
    return directory


def entry(name: str, path, **fields) -> EvalModelConfig:
    return EvalModelConfig(name=name, path=str(path), **fields)


def test_each_model_entry_resolves_to_a_base_and_an_adapter(tmp_path, twin_dirs):
    sft = twin_dirs["gpt2"]
    run = rl_run(tmp_path / "ppo", sft, best=True)
    (dpo := tmp_path / "dpo").mkdir()
    (dpo / "adapter_config.json").write_text("{}")

    (model,) = resolve_models(entry("sft", sft), None, tmp_path / "build", 0)
    assert (model.base, model.adapter, model.run_dir) == (sft, None, None)
    (model,) = resolve_models(entry("dpo", sft, adapter=str(dpo)), None, tmp_path / "build", 0)
    assert (model.base, model.adapter) == (sft, str(dpo))
    (model,) = resolve_models(entry("ppo", run), None, tmp_path / "build", 0)
    assert (model.base, model.adapter, model.run_dir) == (sft, str(run / "checkpoints" / "step_000004" / "adapter"), run)
    (model,) = resolve_models(entry("ppo", run / "checkpoints" / "step_000002", checkpoint="best"), None, tmp_path / "b", 0)
    assert model.adapter == str(run / "checkpoints" / "best" / "adapter")
    (model,) = resolve_models(entry("ppo", run / "checkpoints" / "step_000002"), None, tmp_path / "b", 0)
    assert model.adapter == str(run / "checkpoints" / "step_000002" / "adapter")
    warm = rl_run(tmp_path / "warm", "builtin:tiny-llama", sft_steps=10)
    assert resolve_models(entry("warm", warm), None, tmp_path / "b", 0)[0].base == str(warm / "sft_model")
    built = rl_run(tmp_path / "built", "builtin:tiny-llama")
    assert resolve_models(entry("built", built), None, tmp_path / "b", 0)[0].base == str(built / "base_model")


def test_a_directory_of_seed_runs_is_one_model_per_seed(tmp_path, twin_dirs):
    for seed in (123, 42, 777):
        rl_run(tmp_path / "grpo" / f"seed_{seed}", twin_dirs["gpt2"], seed=seed)
    models = resolve_models(entry("grpo", tmp_path / "grpo"), None, tmp_path / "build", 0)
    assert [(m.seed, m.label, m.samples_file) for m in models] == [
        (s, f"grpo@seed_{s}", f"grpo_seed_{s}_samples.jsonl") for s in (42, 123, 777)]
    assert [m.seed for m in resolve_models(entry("grpo", tmp_path / "grpo"), [777, 42], tmp_path / "b", 0)] == [777, 42]
    with pytest.raises(ValueError, match=r"holds seeds \[42, 123, 777\], not \[5\]; fix evaluation.seeds"):
        resolve_models(entry("grpo", tmp_path / "grpo"), [5], tmp_path / "b", 0)


def test_a_best_checkpoint_that_was_never_written_and_a_misplaced_adapter_name_the_fix(tmp_path, twin_dirs):
    run = rl_run(tmp_path / "ppo", twin_dirs["gpt2"])
    with pytest.raises(ValueError, match="has no checkpoints/best .*set eval.every in that run"):
        resolve_models(entry("ppo", run, checkpoint="best"), None, tmp_path / "b", 0)
    with pytest.raises(ValueError, match="is an RL run, which brings its own adapter; remove adapter"):
        resolve_models(entry("ppo", run, adapter=str(tmp_path)), None, tmp_path / "b", 0)
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        resolve_models(entry("dpo", twin_dirs["gpt2"], adapter=str(tmp_path)), None, tmp_path / "b", 0)


def test_models_on_one_base_share_rollout_actors_and_a_bare_model_rides_a_zero_adapter(tmp_path):
    adapters = {}
    for name, rank in (("ppo", 8), ("grpo", 8), ("big", 16)):
        adapters[name] = tmp_path / name
        adapters[name].mkdir()
        (adapters[name] / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16, "target_modules": ["q", "v"]}))
    instances = [ModelInstance("base", None, "B0", None), ModelInstance("sft", None, "S", None),
                 ModelInstance("ppo", None, "S", str(adapters["ppo"])), ModelInstance("grpo", None, "S", str(adapters["grpo"])),
                 ModelInstance("big", None, "S", str(adapters["big"]))]
    groups = [(key[0], key[1][0] if key[1] else None, [m.name for m in members], template)
              for key, members, template in rollout_groups(instances)]
    assert groups == [("S", 8, ["sft", "ppo", "grpo"], str(adapters["ppo"])), ("S", 16, ["big"], str(adapters["big"])),
                      ("B0", None, ["base"], None)]


def test_scorer_scores_what_the_engine_sampled_and_a_model_has_no_kl_to_itself(twin_dirs, tmp_path):
    from raylign.actors.engines import HFEngine
    from raylign.common.model_checks import load_tokenizer
    from raylign.common.types import PromptItem
    from raylign.learner.sequence_scorer import SequenceScorer

    model = twin_dirs["gpt2"]
    tokenizer = load_tokenizer(model)
    settings = SamplingSettings(samples_per_prompt=2, max_new_tokens=6, min_new_tokens=2, temperature=0.9, top_p=0.8)
    prompts = [PromptItem(index=i, text=t, token_ids=tokenizer(t)["input_ids"], seed=i)
               for i, t in enumerate(["Honestly, the plot was", "the music"])]
    samples = [Sample(prompt.index, k, prompt.text, prompt.token_ids, "", c.token_ids, c.logprobs, 0, c.finish_reason)
               for prompt, completions in zip(prompts, HFEngine(model).generate(prompts, settings))
               for k, c in enumerate(completions)]
    scorer = SequenceScorer(reference=model)
    assert scorer.load_policy(model, None, 1) is None
    scored = scorer.score(samples, settings)
    metrics = evaluation_metrics([s.prompt for s in samples], ["a"] * 4, [len(s.completion_ids) for s in samples], [1.0] * 4,
                                 samples_per_prompt=2, policy_logprobs=[r["policy"] for r in scored],
                                 reference_logprobs=[r["reference"] for r in scored],
                                 behaviour_logprobs=[s.behaviour_logprobs for s in samples])
    assert metrics["logprob_gap"] < 1e-5
    # The reference is the same model, but without the top-p truncation the samples were drawn under.
    assert metrics["kl"] > 0 and metrics["kl_k1"] > 0
    untruncated = SamplingSettings(samples_per_prompt=2, max_new_tokens=6, min_new_tokens=2, temperature=0.9)
    scored = scorer.score(samples, untruncated)
    assert max(abs(p - r) for row in scored for p, r in zip(row["policy"], row["reference"])) < 1e-6

    # A model without an adapter, sampled through a zero adapter of another adapter's shape: B = 0, same scores.
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path)
    update = scorer.load_policy(model, None, 2, zero_like=str(tmp_path))
    weights = load(update.files["adapter_model.safetensors"])
    assert update.version == 2 and any("lora_B" in name for name in weights)
    assert all(float(t.abs().max()) == 0.0 for name, t in weights.items() if "lora_B" in name)
    assert scorer.score(samples, untruncated) == scored


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-style chat endpoint preferring a response with 'great', then one with 'fine'; biased, always A."""

    biased = False

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        first, second = text.split("[Response A]")[1].split("[Response B]")
        prefers_first = "great" in first or ("great" not in second and "fine" in first)
        verdict = "[[A]]" if self.biased or prefers_first else "[[B]]"
        payload = json.dumps({"choices": [{"message": {"content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def samples_for(answers: list[str]) -> list[Sample]:
    return [Sample(i, 0, f"prompt {i}", [1], answer, [2], [0.0], 0, "stop") for i, answer in enumerate(answers)]


def test_judge_counts_wins_only_when_both_orders_agree(tmp_path, judge_url):
    cfg = config(tmp_path, models=[{"name": "sft", "path": "builtin:tiny-gpt2"}, {"name": "ppo", "path": "builtin:tiny-gpt2"}],
                 judge={"base_url": judge_url, "model": "fake", "baseline": "sft"})
    instances = [ModelInstance("sft", None, "b", None), ModelInstance("ppo", 1, "b", "a"), ModelInstance("ppo", 2, "b", "a")]
    samples_of = {"sft": samples_for(["fine"] * 4), "ppo@seed_1": samples_for(["great"] * 3 + ["bad"]),
                  "ppo@seed_2": samples_for(["great", "ok", "ok", "ok"])}
    judged = run_judge(cfg, instances, samples_of)
    ppo = judged["models"]["ppo"]
    assert [(r["seed"], r["wins"], r["losses"], r["ties"]) for r in ppo["per_seed"]] == [(1, 3, 1, 0), (2, 1, 3, 0)]
    assert (ppo["pooled"]["wins"], ppo["pooled"]["losses"], ppo["pooled"]["win_rate"]) == (4, 4, 0.5)
    low, high = ppo["pooled"]["ci_low"], ppo["pooled"]["ci_high"]
    assert low == pytest.approx(1 - high) and 0.2 < low < 0.25  # Wilson, n = 8, centred on 0.5

    FakeJudge.biased = True
    try:
        biased = run_judge(cfg, instances, samples_of)["models"]["ppo"]["pooled"]
    finally:
        FakeJudge.biased = False
    assert (biased["wins"], biased["losses"], biased["ties"]) == (0, 0, 8)  # position bias becomes ties


def test_a_seed_run_baseline_is_judged_seed_by_seed(tmp_path, judge_url):
    cfg = config(tmp_path, models=[{"name": "ppo", "path": "builtin:tiny-gpt2"}, {"name": "grpo", "path": "builtin:tiny-gpt2"}],
                 judge={"base_url": judge_url, "model": "fake", "baseline": "ppo"})
    instances = [ModelInstance(name, seed, "b", "a") for name in ("ppo", "grpo") for seed in (1, 2)]
    samples_of = {"ppo@seed_1": samples_for(["fine"] * 2), "ppo@seed_2": samples_for(["great"] * 2),
                  "grpo@seed_1": samples_for(["great"] * 2), "grpo@seed_2": samples_for(["fine"] * 2)}
    grpo = run_judge(cfg, instances, samples_of)["models"]["grpo"]
    assert [(r["seed"], r["wins"], r["losses"]) for r in grpo["per_seed"]] == [(1, 2, 0), (2, 0, 2)]
    with pytest.raises(ValueError, match="grpo@seed_3 has no ppo run at its seed"):
        run_judge(cfg, instances + [ModelInstance("grpo", 3, "b", "a")], {**samples_of, "grpo@seed_3": samples_for(["x"])})


def test_evaluation_config_names_the_field_value_and_fix(tmp_path):
    with pytest.raises(ValueError, match="reference = 'base' is not one of the models \\(sft\\)"):
        config(tmp_path, reference="base")
    with pytest.raises(ValueError, match="pass_k = \\[1, 5\\]: 5 needs between 1 and rollout.samples_per_prompt = 2"):
        config(tmp_path, pass_k=[1, 5])
    with pytest.raises(ValueError, match="the name 'sft' is used twice"):
        config(tmp_path, models=[{"name": "sft", "path": "builtin:tiny-gpt2"}] * 2)
    with pytest.raises(ValueError, match="judge.baseline = 'gpt4' is not one of the models"):
        config(tmp_path, judge={"base_url": "http://x/v1", "model": "m", "baseline": "gpt4"})


def test_evaluate_cli_refuses_a_bad_config_with_status_2(tmp_path, capsys):
    from raylign.cluster.cli import main

    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "models": [{"name": "x", "path": str(tmp_path / "missing")}]}))
    assert main(["evaluate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raylign evaluate: models[name='x'].path = '{tmp_path / 'missing'}' does not exist")
    path.write_text(yaml.safe_dump({"models": [{"name": "x", "path": "builtin:tiny-gpt2"}], "pass_k": [9]}))
    assert main(["evaluate", str(path)]) == 2
    assert capsys.readouterr().err.startswith("raylign evaluate: invalid evaluation config:\n  pass_k = [9]: 9 needs")


def test_evaluate_cli_verbose_leaves_the_actors_output_to_the_console(tmp_path, monkeypatch):
    """`--verbose` reaches evaluate(), which then gives the actors no log directory (cluster/console.py)."""
    from raylign.cluster import model_evaluation
    from raylign.cluster.cli import main
    from raylign.cluster.console import actor_log_dir

    seen = []

    def record(config, verbose=False):
        seen.append(actor_log_dir(model_evaluation.pool_config(config, "builtin:tiny-llama", 8, verbose)))
        return {"models": {}}

    monkeypatch.setattr(model_evaluation, "evaluate", record)
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "models": [{"name": "x", "path": "builtin:tiny-llama"}]}))
    assert main(["evaluate", str(path)]) == 0 and main(["evaluate", str(path), "--verbose"]) == 0
    assert seen == [str(tmp_path / "out" / "logs"), None]


@pytest.mark.slow
def test_raylign_evaluate_compares_a_run_with_the_model_it_started_from(warm_model_dir, ray_session, tmp_path, capsys):
    from raylign.cluster.cli import main
    from raylign.cluster.driver import train
    from raylign.common.config import load_config

    run = tmp_path / "run"
    train(load_config("configs/quickstart.yaml", [
        f"output_dir={run}", f"model.path={warm_model_dir}", "sft.steps=0", "rollout.backend=hf", "train.steps=2",
        "train.prompts_per_step=4", "eval.every=2", "eval.val_samples=4", "eval.test_samples=4",
        "eval.samples_per_prompt=2", "logging.progress=false"]))
    models = f"models=[{{name: sft, path: {warm_model_dir}}}, {{name: grpo, path: {run}, checkpoint: best}}]"
    # On the config's own engine, vLLM: the SFT model rides a zero adapter, the GRPO policy its best adapter.
    assert main(["evaluate", "configs/evaluate_quickstart.yaml", f"output_dir={tmp_path / 'eval'}", models,
                 "data.max_prompts=6"]) == 0
    assert "evaluation.md" in capsys.readouterr().out
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    sft, grpo = (evaluation["models"][name]["runs"][0] for name in ("sft", "grpo"))
    assert grpo["adapter"] == str(run / "checkpoints" / "best" / "adapter") and grpo["base"] == warm_model_dir
    assert sft["metrics"]["kl"] == pytest.approx(0.0, abs=1e-6) and grpo["metrics"]["kl"] > 0
    assert sft["rollout_engine"]["backend"] == grpo["rollout_engine"]["backend"] == "vllm"
    # The scorer's logprobs of vLLM's tokens are vLLM's own: the engine sampled the model that was scored.
    assert max(sft["metrics"]["logprob_gap"], grpo["metrics"]["logprob_gap"]) < 1e-4
    assert evaluation["prompts"] == {"source": "builtin:movie-reviews", "split": "test", "count": 6,
                                     "samples_per_prompt": 4, "categories": []}
    assert {"pass@1", "pass@4", "distinct_2", "self_bleu"} <= set(grpo["metrics"])
    samples = [json.loads(line) for line in (tmp_path / "eval" / "grpo_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and all(set(s["rewards"]) == {"vader_sentiment"} for s in samples)
    # Each actor's output is in the evaluation's logs/, as a run's is (one rollout group: both share a base).
    logs = tmp_path / "eval" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["reward.log", "rollout.log", "scorer.log"]
    for role, actor in (("reward", "RewardWorker"), ("rollout", "RolloutWorker"), ("scorer", "SequenceScorer")):
        assert (logs / f"{role}.log").read_text().startswith(f"---- {actor} (pid "), role


def test_rl_runs_compared_by_an_evaluation_must_have_run_the_same_experiment(tmp_path, twin_dirs):
    from raylign.cluster.model_evaluation import check_models_comparable
    from raylign.common.comparability import IncomparableRuns

    ppo = ModelInstance("ppo", None, "b", "a", rl_run(tmp_path / "ppo", twin_dirs["gpt2"]))
    grpo = ModelInstance("grpo", None, "b", "a", rl_run(tmp_path / "grpo", twin_dirs["llama"]))
    with pytest.raises(IncomparableRuns, match=r"model.path: .* \(evaluation.allow_different model.path\)"):
        check_models_comparable([ppo, grpo], config(tmp_path))
    allowed = check_models_comparable([ppo, grpo], config(tmp_path, allow_different=["model.path"]))
    assert [d.field for d in allowed.allowed] == ["model.path"]
    assert check_models_comparable([ppo, ModelInstance("sft", None, "b", None)], config(tmp_path)) is None
