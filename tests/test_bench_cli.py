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
