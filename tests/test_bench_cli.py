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
