"""The pipeline's `storage` root (common/storage.py, cluster/pipeline.py) on file:// URIs and plain directories
(tests/test_storage_s3.py runs the same calls on s3:// against a local S3 server)."""

import json
import os
import shutil
import textwrap
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from raylign.common import storage
from raylign.common.config import ConfigError, check_model_path
from raylign.common.pipeline_config import load_pipeline_config
from raylign.common.storage import StorageError, cache_dir, is_uri, local_copy, upload_dir

# The cache the Ray actors use: every test but the one on Ray gets a cache of its own.
ACTORS_CACHE_HOME = os.environ.get("XDG_CACHE_HOME")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def make_stage_dir(path: Path) -> Path:
    (path / "adapter").mkdir(parents=True)
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (path / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (path / "results.json").write_text(json.dumps({"artefact": str(path), "seconds": 1.5}))
    return path


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def count_copies(monkeypatch) -> list[str]:
    """Record the source of every pyarrow copy (still doing the copy)."""
    calls = []
    copy = pafs.copy_files

    def counted(source, destination, **kwargs):
        calls.append(source)
        return copy(source, destination, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", counted)
    return calls


# ----- local_copy and upload_dir -----


def test_only_scheme_urls_are_uris():
    assert is_uri("s3://bucket/run/sft") and is_uri("file:///tmp/store") and is_uri("gs://b/p")
    assert not is_uri("/shared/store/sft") and not is_uri("outputs/sft") and not is_uri("Qwen/Qwen2.5-0.5B")
    assert not is_uri(Path("/tmp/x"))


def test_a_plain_path_is_returned_unchanged_and_nothing_is_cached(tmp_path):
    assert local_copy(str(tmp_path / "somewhere")) == str(tmp_path / "somewhere")
    assert local_copy("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert not cache_dir().exists()


def test_an_uploaded_directory_comes_back_byte_for_byte_under_its_own_name(tmp_path):
    local = make_stage_dir(tmp_path / "out" / "sft")
    upload_dir(local, f"file://{tmp_path}/store/sft")

    assert tree(tmp_path / "store" / "sft") == tree(local)
    copy = Path(local_copy(f"file://{tmp_path}/store/sft"))
    assert copy.name == "sft" and copy.parent.parent == cache_dir()
    assert tree(copy) == tree(local)
    # A single file keeps its name (its suffix tells the data loaders its format).
    one = Path(local_copy(f"file://{tmp_path}/store/sft/adapter/adapter_model.safetensors"))
    assert one.name == "adapter_model.safetensors" and one.read_bytes() == bytes(range(256)) * 40


def test_a_cached_copy_is_reused_without_downloading_again(tmp_path, monkeypatch):
    check_a_cached_copy_is_reused(f"file://{tmp_path}/store", tmp_path, monkeypatch)


def check_a_cached_copy_is_reused(store: str, tmp_path: Path, monkeypatch) -> None:
    """A stage uploaded to `store` (file:// here, s3:// in tests/test_storage_s3.py) and opened twice is
    downloaded once."""
    upload_dir(make_stage_dir(tmp_path / "out" / "sft"), f"{store}/sft")
    copies = count_copies(monkeypatch)

    first = local_copy(f"{store}/sft")
    second = local_copy(f"{store}/sft")

    assert first == second and len(copies) == 1
    assert len(list(cache_dir().iterdir())) == 1


def test_two_readers_asking_for_the_same_copy_at_once_download_it_once(tmp_path, monkeypatch):
    import threading
    import time

    upload_dir(make_stage_dir(tmp_path / "out" / "sft"), f"file://{tmp_path}/store/sft")
    copy = pafs.copy_files
    copies = []

    def slow_copy(source, destination, **kwargs):
        copies.append(source)
        time.sleep(0.3)  # the second reader arrives while the first is downloading
        return copy(source, destination, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", slow_copy)
    paths = []
    readers = [threading.Thread(target=lambda: paths.append(local_copy(f"file://{tmp_path}/store/sft"))) for _ in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    assert len(copies) == 1 and tree(Path(paths[0])) == tree(tmp_path / "out" / "sft")


def test_a_stage_uploaded_again_with_other_files_is_downloaded_again(tmp_path):
    local = make_stage_dir(tmp_path / "out" / "sft")
    upload_dir(local, f"file://{tmp_path}/store/sft")
    old = Path(local_copy(f"file://{tmp_path}/store/sft"))

    (local / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "n_positions": 64}')
    (local / "adapter" / "adapter_model.safetensors").unlink()
    upload_dir(local, f"file://{tmp_path}/store/sft")
    new = Path(local_copy(f"file://{tmp_path}/store/sft"))

    assert new != old and tree(new) == tree(local)
    assert not (tmp_path / "store" / "sft" / "adapter" / "adapter_model.safetensors").exists()  # the old files went


def test_a_half_written_cache_entry_is_never_returned(tmp_path, monkeypatch):
    upload_dir(make_stage_dir(tmp_path / "out" / "sft"), f"file://{tmp_path}/store/sft")
    copy = pafs.copy_files

    def dies_halfway(source, destination, **kwargs):
        Path(destination).mkdir(parents=True, exist_ok=True)
        (Path(destination) / "config.json").write_text('{"archi')
        raise OSError("connection reset by peer")

    monkeypatch.setattr(pafs, "copy_files", dies_halfway)
    with pytest.raises(OSError, match="connection reset"):
        local_copy(f"file://{tmp_path}/store/sft")
    assert list(cache_dir().iterdir()) == []  # neither an entry nor the partial download is left

    # A download killed outright leaves its temporary directory; it is never taken for the entry.
    monkeypatch.setattr(pafs, "copy_files", copy)
    stale = cache_dir() / ".0123abcd.999.deadbeef.partial" / "sft"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text('{"archi')
    result = Path(local_copy(f"file://{tmp_path}/store/sft"))
    assert ".partial" not in str(result)
    assert json.loads((result / "config.json").read_text()) == {"architectures": ["LlamaForCausalLM"]}


def test_a_missing_uri_is_an_error_naming_it(tmp_path):
    with pytest.raises(StorageError, match=f"'file://{tmp_path}/store/nope' does not exist in storage"):
        local_copy(f"file://{tmp_path}/store/nope")


def test_results_json_is_uploaded_last_and_a_stage_is_replaced_whole(tmp_path, monkeypatch):
    local = make_stage_dir(tmp_path / "out" / "rm")
    (tmp_path / "store" / "rm").mkdir(parents=True)
    (tmp_path / "store" / "rm" / "stale.bin").write_text("from an earlier run")
    copies = count_copies(monkeypatch)

    upload_dir(local, str(tmp_path / "store" / "rm"))  # a plain (shared) directory: the same code path

    assert [Path(c).name for c in copies][-1] == "results.json" and len(copies) == 3
    assert tree(tmp_path / "store" / "rm") == tree(local)


def test_a_model_in_storage_is_checked_there_naming_the_field_without_downloading_it(tmp_path):
    from raylign.common.model_checks import check_has_tokenizer, model_architecture

    uri = f"file://{tmp_path}/store/sft"
    upload_dir(make_stage_dir(tmp_path / "out" / "sft"), uri)
    check_model_path(uri, field="model.path")
    with pytest.raises(ValueError, match=f"model.path = 'file://{tmp_path}/store/gone' does not exist in storage"):
        check_model_path(f"file://{tmp_path}/store/gone", field="model.path")
    with pytest.raises(ValueError, match=f"model.path = '{uri}' has no tokenizer"):
        check_has_tokenizer(uri, "model.path")
    assert model_architecture(uri) == "LlamaForCausalLM"
    assert not cache_dir().exists()


def test_model_and_data_loaders_open_an_artefact_in_storage_through_a_local_copy(tmp_path):
    from raylign.common.data import load_text_column
    from raylign.common.model_checks import load_tokenizer, max_positions, model_architecture
    from raylign.common.preference_data import load_preference_data
    from raylign.common.tiny_model import build_tiny_model

    stage = build_tiny_model(tmp_path / "out" / "rm", family="llama", seed=0)
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad", "split": "policy" if i % 2 else "val"} for i in range(6)]
    (Path(stage) / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    root = f"file://{tmp_path}/store/rm"
    upload_dir(stage, root)
    shutil.rmtree(stage)  # only storage holds it now

    assert load_tokenizer(root)("the movie was").input_ids == load_tokenizer(local_copy(root))("the movie was").input_ids
    assert model_architecture(root) == "LlamaForCausalLM" and max_positions(root) > 0
    assert load_text_column(f"{root}/prompts.jsonl", "prompt", "policy") == ["p1", "p3", "p5"]
    val = load_preference_data(f"{root}/prompts.jsonl", "jsonl", "val")
    assert [(e.prompt, e.chosen, e.rejected) for e in val] == [("p0", "good", "bad"), ("p2", "good", "bad"), ("p4", "good", "bad")]


# ----- the pipeline's storage field -----


SFT_THEN_RM = """
    output_dir: {out}
    storage: "{storage}"
    stages:
      - name: sft
        kind: sft
        model: {{path: "builtin:tiny-llama"}}
        data: {{source: "builtin:movie-reviews", max_rows: 200}}
        training: {{steps: 3, batch_size: 8, max_length: 32}}
      - name: rm
        kind: reward_model
        model: {{path: "{{sft}}"}}
        data: {{source: "builtin:movie-preferences", max_rows: 200}}
        training: {{steps: 3, batch_size: 8, max_length: 32}}
"""


def pipeline(tmp_path: Path, storage_root: str, overrides=()):
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(SFT_THEN_RM.format(out=tmp_path / "out", storage=storage_root)))
    return load_pipeline_config(path, list(overrides))


def test_a_storage_uri_pyarrow_cannot_read_is_refused_naming_the_field_value_and_fix(tmp_path):
    with pytest.raises(ConfigError) as error:
        pipeline(tmp_path, "ftp://host/store")
    message = str(error.value)
    assert "storage = 'ftp://host/store': pyarrow.fs has no filesystem for 'ftp://'" in message
    assert "s3://bucket/prefix" in message and "shared filesystem path" in message


def test_a_storage_uri_with_a_query_string_is_refused_since_stage_paths_are_appended_to_it(tmp_path):
    with pytest.raises(ConfigError) as error:
        pipeline(tmp_path, "s3://bucket/store?endpoint_override=127.0.0.1:9000&scheme=http")
    message = str(error.value)
    assert "storage = 's3://bucket/store?endpoint_override=127.0.0.1:9000&scheme=http': a URI with a query string" in message
    assert "AWS_ENDPOINT_URL" in message


def test_unreachable_storage_fails_before_any_stage_naming_the_field(tmp_path):
    from raylign.cluster.pipeline import run_pipeline

    (tmp_path / "a_file").write_text("not a directory")
    config = pipeline(tmp_path, f"file://{tmp_path}/a_file/store")
    with pytest.raises(ConfigError, match=f"storage = 'file://{tmp_path}/a_file/store' cannot be reached or written"):
        run_pipeline(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("root", ["out", "out/store", ".", "file://{tmp}/out"])
def test_storage_overlapping_output_dir_is_refused_since_uploading_would_empty_the_stage(tmp_path, root):
    with pytest.raises(ConfigError, match=r"storage = '.*' overlaps output_dir = .*must be separate directories"):
        pipeline(tmp_path, root.format(tmp=tmp_path) if root.startswith("file") else str(tmp_path / root))


def test_a_relative_storage_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pipeline(tmp_path, "shared/store").storage == str(tmp_path / "shared" / "store")


def test_a_stage_that_starts_again_is_not_done_in_storage_until_it_is_uploaded_again(tmp_path):
    from raylign.cluster.pipeline import PipelineError, run_pipeline

    root = f"file://{tmp_path}/store"
    upload_dir(make_stage_dir(tmp_path / "elsewhere" / "sft"), storage.join(root, "sft"))
    config = pipeline(tmp_path, root, [f"stages.sft.data.source={tmp_path}/missing.jsonl"])
    with pytest.raises(PipelineError, match="stage 'sft' \\(sft\\) failed"):
        run_pipeline(config, force=["sft"])
    # The failed forced re-run left no results.json behind: the next run does not take the old one for finished.
    assert not (tmp_path / "store" / "sft" / "results.json").exists()


@pytest.mark.parametrize("kind", ["uri", "directory"])
def test_stages_done_in_storage_are_skipped_and_later_stages_refer_to_storage(tmp_path, kind):
    from raylign.cluster.pipeline import run_pipeline

    root = f"file://{tmp_path}/store" if kind == "uri" else str(tmp_path / "store")
    for name in ("sft", "rm"):
        # Written by another node: its results name its own local directory, and where the artefact is stored.
        upload_dir(make_stage_dir(tmp_path / "elsewhere" / name), storage.join(root, name))
        results = json.loads((tmp_path / "store" / name / "results.json").read_text())
        results["stored_artefact"] = storage.join(root, name)
        (tmp_path / "store" / name / "results.json").write_text(json.dumps(results))

    summary = run_pipeline(pipeline(tmp_path, root))

    assert [row["status"] for row in summary["stages"]] == ["skipped", "skipped"]
    assert [row["artefact"] for row in summary["stages"]] == [storage.join(root, "sft"), storage.join(root, "rm")]
    assert not (tmp_path / "out" / "sft").exists()


@pytest.mark.parametrize("kind", ["uri", "directory"])
def test_a_stored_stage_is_found_where_its_storage_root_was_moved(tmp_path, kind):
    from raylign.cluster.pipeline import TrainStage, read_stored_results, store_stage

    def root(name: str) -> str:
        return f"file://{tmp_path}/{name}" if kind == "uri" else str(tmp_path / name)

    stage_dir = make_stage_dir(tmp_path / "out" / "ppo")
    results = {"artefact": str(stage_dir / "adapter"), "wall_seconds": 1.0}
    stage = TrainStage.model_construct(name="ppo", kind="train", run={})  # store_stage reads only its kind
    stored = store_stage(stage, stage_dir, storage.join(root("store"), "ppo"), results)
    assert stored["artefact"] == storage.join(root("store"), "ppo", "adapter")
    assert json.loads((tmp_path / "store" / "ppo" / "results.json").read_text())["stored_artefact"] == "adapter"

    (tmp_path / "store").rename(tmp_path / "moved")
    assert read_stored_results(storage.join(root("moved"), "ppo"))["artefact"] == storage.join(root("moved"), "ppo", "adapter")


def test_an_evaluate_stage_gets_a_local_copy_of_each_rl_run_around_its_checkpoint(tmp_path):
    from raylign.cluster.pipeline import local_artefacts

    run = tmp_path / "out" / "ppo"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002" / "driver_state.json").write_text('{"step": 2}')
    (run / "config.yaml").write_text("model: {path: file:///store/sft}\n")
    root = f"file://{tmp_path}/store"
    upload_dir(run, f"{root}/ppo")
    upload_dir(make_stage_dir(tmp_path / "out" / "sft"), f"{root}/sft")
    config = pipeline(tmp_path, root)
    artefacts = {"sft": f"{root}/sft", "ppo": f"{root}/ppo/checkpoints/step_000002"}

    local = local_artefacts(config, artefacts, {"ppo"})

    checkpoint = Path(local["ppo"])
    assert checkpoint.name == "step_000002" and (checkpoint / "driver_state.json").is_file()
    assert (checkpoint.parent.parent / "config.yaml").read_text() == "model: {path: file:///store/sft}\n"
    assert local["sft"] == f"{root}/sft"  # not used by the stage: not downloaded
    assert len(list(cache_dir().iterdir())) == 1


# ----- end to end, on Ray -----


@pytest.mark.slow
def test_a_pipeline_with_storage_runs_each_stage_from_storage_alone_and_skips_both_on_rerun(ray_session, tmp_path, monkeypatch):
    run_sft_then_rm_from_storage_alone(tmp_path, monkeypatch, f"file://{tmp_path}/store")


def run_sft_then_rm_from_storage_alone(tmp_path: Path, monkeypatch, store: str) -> None:
    """The SFT -> reward-model pipeline with `storage: store`, each stage's output moved away once uploaded (the
    next stage runs as if on another node: only storage holds it); then a re-run, which skips both stages."""
    import torch

    from raylign.cluster import pipeline as pipeline_module
    from raylign.common.reward_models import load_reward_model

    # The actors cache their downloads under their own $XDG_CACHE_HOME; the test removes what it added there.
    if ACTORS_CACHE_HOME is None:
        monkeypatch.delenv("XDG_CACHE_HOME")
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", ACTORS_CACHE_HOME)
    before = set(cache_dir().iterdir()) if cache_dir().is_dir() else set()
    config = pipeline(tmp_path, store)
    store_stage = pipeline_module.store_stage

    def store_then_move_away(stage, stage_dir, stored, results):
        results = store_stage(stage, stage_dir, stored, results)
        (tmp_path / "moved").mkdir(exist_ok=True)
        shutil.move(stage_dir, tmp_path / "moved" / stage_dir.name)
        return results

    monkeypatch.setattr(pipeline_module, "store_stage", store_then_move_away)
    try:
        summary = pipeline_module.run_pipeline(config)

        assert [row["status"] for row in summary["stages"]] == ["done", "done"]
        assert [row["artefact"] for row in summary["stages"]] == [f"{store}/sft", f"{store}/rm"]
        assert not (tmp_path / "out" / "sft").exists() and not (tmp_path / "out" / "rm").exists()
        assert storage.exists(f"{store}/sft/model.safetensors")
        # The RM stage trained on the SFT model it read from storage.
        rm_stage = yaml.safe_load(storage.read_text(f"{store}/rm/stage.yaml"))
        assert rm_stage["model"]["path"] == f"{store}/sft"
        stored = json.loads(storage.read_text(f"{store}/rm/results.json"))
        assert stored["stored_artefact"] == "." and stored["steps"] == 3  # relative: the bucket may move

        # Read back from storage, the reward model scores as the one the stage wrote.
        reward_model = load_reward_model(f"{store}/rm", "scalar")
        written = load_reward_model(str(tmp_path / "moved" / "rm"), "scalar")
        texts = (["The movie was"] * 2, ["wonderful and fun.", "awful and dull."])
        assert torch.allclose(torch.tensor(reward_model.score_prompt_completions(*texts)),
                              torch.tensor(written.score_prompt_completions(*texts)))

        shutil.rmtree(tmp_path / "out")
        again = pipeline_module.run_pipeline(config)
        assert [row["status"] for row in again["stages"]] == ["skipped", "skipped"]
        assert [row["artefact"] for row in again["stages"]] == [f"{store}/sft", f"{store}/rm"]
    finally:
        for entry in set(cache_dir().iterdir()) - before if cache_dir().is_dir() else ():
            shutil.rmtree(entry, ignore_errors=True)


def test_raylign_evaluate_reads_an_adapter_in_storage_through_a_local_copy(tmp_path, twin_dirs):
    from raylign.cluster.model_evaluation import resolve_models
    from raylign.common.evaluate_config import EvalModelConfig

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    upload_dir(adapter, f"file://{tmp_path}/store/adapter")
    entry = EvalModelConfig(name="policy", path=twin_dirs["llama"], adapter=f"file://{tmp_path}/store/adapter")
    (instance,) = resolve_models(entry, None, tmp_path / "build", 0)
    assert instance.adapter == str(storage.cache_dir() / Path(instance.adapter).parent.name / "adapter")
    assert json.loads((Path(instance.adapter) / "adapter_config.json").read_text())["r"] == 8


def test_a_path_inside_a_copy_maps_back_to_the_uri_it_was_downloaded_from(tmp_path):
    upload_dir(make_stage_dir(tmp_path / "out" / "sft"), f"file://{tmp_path}/store/sft")
    copy = Path(local_copy(f"file://{tmp_path}/store/sft"))

    assert storage.stored_location(copy) == f"file://{tmp_path}/store/sft"
    assert storage.stored_location(copy / "adapter") == f"file://{tmp_path}/store/sft/adapter"
    assert storage.stored_location(str(tmp_path / "out" / "sft")) == str(tmp_path / "out" / "sft")  # not a copy
    assert storage.stored_location("builtin:tiny-llama") == "builtin:tiny-llama"
    assert storage.stored_location("s3://bucket/sft") == "s3://bucket/sft"  # a URI is passed on whole
    assert storage.stored_location(f"file://{tmp_path}/store/sft") == f"file://{tmp_path}/store/sft"


def test_a_cache_entry_without_its_source_uri_is_downloaded_again(tmp_path):
    """Entries written before they recorded their URI: stored_location could not map them back."""
    upload_dir(make_stage_dir(tmp_path / "out" / "sft"), f"file://{tmp_path}/store/sft")
    copy = Path(local_copy(f"file://{tmp_path}/store/sft"))
    (copy.parent / storage.SOURCE_FILE).unlink()
    assert Path(local_copy(f"file://{tmp_path}/store/sft")) == copy
    assert storage.stored_location(copy) == f"file://{tmp_path}/store/sft"


def test_an_evaluate_stage_hands_its_actors_storage_uris_and_reads_its_own_copies(tmp_path):
    """On a cluster the rollout, reward and scorer actors may run on other nodes than the driver, whose
    copies of the stages they cannot open: they get the URIs and download them themselves."""
    from raylign.cluster.model_evaluation import for_actors, resolve_models, reward_for_actors
    from raylign.cluster.pipeline import local_artefacts
    from raylign.common.config import RewardConfig
    from raylign.common.evaluate_config import EvalModelConfig

    run = tmp_path / "out" / "ppo"
    checkpoint = run / "checkpoints" / "step_000002"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "driver_state.json").write_text('{"step": 2}')
    (checkpoint / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (run / "config.yaml").write_text("model: {path: file:///store/sft}\n")
    root = f"file://{tmp_path}/store"
    upload_dir(run, f"{root}/ppo")
    upload_dir(make_stage_dir(tmp_path / "out" / "rm"), f"{root}/rm")
    artefacts = {"ppo": f"{root}/ppo/checkpoints/step_000002", "rm": f"{root}/rm"}
    local = local_artefacts(pipeline(tmp_path, root), artefacts, {"ppo", "rm"})

    (instance,) = resolve_models(EvalModelConfig(name="ppo", path=local["ppo"]), None, tmp_path / "build", 0)
    assert Path(instance.adapter).is_relative_to(cache_dir())  # the driver reads its copy
    assert for_actors(instance.adapter) == f"{root}/ppo/checkpoints/step_000002/adapter"
    assert for_actors(instance.base) == "file:///store/sft"  # the run's model.path: a URI, passed on whole
    assert for_actors(None) is None
    reward = RewardConfig.model_construct(function=None, sources=[
        storage_source("scalar_rm", local["rm"]), storage_source("vader_sentiment", None),
        storage_source("seqcls_rm", local["rm"], {"adapter": f"{local['rm']}/adapter"})])
    actors_reward = reward_for_actors(reward).sources
    assert [source.path for source in actors_reward] == [f"{root}/rm", None, f"{root}/rm"]
    assert actors_reward[2].options == {"adapter": f"{root}/rm/adapter"}


def storage_source(name, path, options=None):
    from raylign.common.config import RewardSourceConfig

    return RewardSourceConfig.model_construct(name=name, path=path, weight=1.0, options=options or {})


def test_prune_deletes_only_copies_idle_longer_than_asked_and_lists_them_first(tmp_path, capsys):
    from raylign.cluster.cli import main

    for name in ("old", "new"):
        upload_dir(make_stage_dir(tmp_path / "out" / name), f"file://{tmp_path}/store/{name}")
    old, new = (Path(local_copy(f"file://{tmp_path}/store/{name}")) for name in ("old", "new"))
    ten_days_ago = os.path.getmtime(old.parent) - 10 * 86400
    os.utime(old.parent, (ten_days_ago, ten_days_ago))

    assert main(["cache", "prune", "--older-than-days", "7", "--dry-run"]) == 0
    assert f"file://{tmp_path}/store/old" in capsys.readouterr().out and old.is_dir()
    assert main(["cache", "prune", "--older-than-days", "7"]) == 0
    assert "1 copies" in capsys.readouterr().out
    assert not old.parent.exists() and new.is_dir()
    # Opening a copy again counts as a use: it is not idle.
    assert Path(local_copy(f"file://{tmp_path}/store/new")) == new
    assert storage.prune_cache(60) == []
    assert main(["cache", "prune", "--older-than-days", "-1"]) == 2


def test_prune_moves_an_entry_away_before_deleting_it_so_an_interrupted_prune_leaves_no_half_copy(tmp_path, monkeypatch):
    upload_dir(make_stage_dir(tmp_path / "out" / "sft"), f"file://{tmp_path}/store/sft")
    copy = Path(local_copy(f"file://{tmp_path}/store/sft"))
    rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.prune_cache(0)
    assert not copy.parent.exists()  # moved away first: local_copy will not find a half-deleted entry
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert Path(local_copy(f"file://{tmp_path}/store/sft")) == copy and (copy / "adapter").is_dir()
    storage.prune_cache(3600)  # too recent to prune; the moved-away leftover goes
    assert copy.is_dir() and not list(cache_dir().glob(".*.pruning"))
