"""`raylign bench`'s command line (the benchmarks themselves are not tests: they write JSON, see README)."""


from raylign.cluster import bench


def test_bench_train_writes_its_json_into_a_folder_it_creates_first(tmp_path, monkeypatch):
    out = tmp_path / "new" / "folder" / "train.json"

    def fake_bench_train(steps, warmup_steps, workloads, modes, out_path, dtype):
        assert out.parent.is_dir()  # before minutes of runs, not after
        return {"benchmark": "train", "steps": steps}

    monkeypatch.setattr(bench, "bench_train", fake_bench_train)
    assert bench.bench_main(["train", "--out", str(out), "--steps", "3"]) == 0
    assert out.parent.is_dir()


def test_bench_staleness_passes_config_overrides_to_every_run(tmp_path, monkeypatch):
    seen = []

    def fake_bench_staleness(steps, seeds, placement, out_path, overrides):
        seen.append((placement, overrides))
        return {"levels": {}}

    monkeypatch.setattr("raylign.cluster.bench_staleness.bench_staleness", fake_bench_staleness)
    assert bench.bench_main(["staleness", "--out", str(tmp_path / "s.json"), "--placement", "split",
                             "rollout.weight_sync=merged"]) == 0
    assert seen == [("split", ["rollout.weight_sync=merged"])]


def test_bench_train_runs_trl_before_and_after_raylign_and_divides_by_their_mean(tmp_path, monkeypatch):
    """A shared machine's speed drifts over minutes: TRL's two runs bracket raylign's modes."""
    from raylign.cluster import bench_train

    order = []

    def fake_trl(model_path, prompts, steps, max_new_tokens, warmup_steps, workdir, dtype):
        order.append("trl")
        return {"step_s": 1.0 if len(order) == 1 else 3.0}

    def fake_raylign(mode, model_path, steps, max_new_tokens, warmup_steps, workdir, dtype):
        order.append(mode)
        return {"step_s": 0.5}

    monkeypatch.setattr(bench_train, "run_trl", fake_trl)
    monkeypatch.setattr(bench_train, "run_raylign", fake_raylign)
    monkeypatch.setattr("raylign.common.tiny_model.resolve_builtin_model", lambda *args, **kwargs: "tiny")
    monkeypatch.setattr("raylign.common.data.load_text_column", lambda *args, **kwargs: ["a prompt"] * 64)
    result = bench_train.bench_train(2, 1, ["tiny"], ["raylign_hf", "raylign_hf_merged"], str(tmp_path / "t.json"))
    assert order == ["trl", "raylign_hf", "raylign_hf_merged", "trl"]
    tiny = result["workloads"]["tiny"]
    assert tiny["trl_step_s"] == 2.0
    assert tiny["speedup_vs_trl"] == {"raylign_hf": 4.0, "raylign_hf_merged": 4.0}


def test_the_orchestration_overhead_is_the_median_of_each_steps_own_remainder():
    """Phases of different steps do not add up: each step's remainder first, then the median."""
    from raylign.cluster.bench_train import summarise_raylign

    def step(total, generate, learner):
        return {"time/step_s": total, "time/generate_s": generate, "time/reward_s": 0.0,
                "time/learner_compute_s": learner, "time/learn_s": learner, "time/publish_s": 0.0,
                "response_length_mean": 24, "rollout/logprob_gap": 1e-7, "reward_mean": 0.5, "rollout/staleness": 0}

    # Medians: step 2.0, generate 0.6, learner 0.7, so a difference of medians would say 0.7 s; every step's own
    # remainder is 0.1 s.
    summary = summarise_raylign([step(1.0, 0.2, 0.7), step(2.0, 1.5, 0.4), step(3.0, 0.6, 2.3)], warmup_steps=0)
    assert summary["step_s"] == 2.0
    assert abs(summary["orchestration_overhead_s"] - 0.1) < 1e-12
    assert abs(summary["orchestration_share"] - 0.05) < 1e-12
