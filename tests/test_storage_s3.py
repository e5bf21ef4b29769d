"""The pipeline's `storage` root on s3:// URIs, against a local S3 server (moto, tests/s3_server.py): the
checks of tests/test_storage.py where S3 differs from a filesystem (directory markers, modification times to
the second, buckets), and the SFT -> reward-model pipeline, whose trainer actor reads the SFT model from the
bucket."""

import time
from pathlib import Path

import pytest

from raylign.common import storage
from raylign.common.config import ConfigError
from raylign.common.storage import cache_dir, local_copy, upload_dir
from tests.s3_server import create_bucket, running_s3_server
from tests.test_storage import (
    check_a_cached_copy_is_reused,
    count_copies,
    make_stage_dir,
    pipeline,
    run_sft_then_rm_from_storage_alone,
    tree,
)
from tests.test_storage import own_cache  # noqa: F401  (autouse: every test gets a cache of its own)


@pytest.fixture(scope="module")
def s3_server(s3_env_before_ray):
    """The endpoint and credentials of a local S3 server: the session's when a test here runs Ray actors
    (tests/conftest.py), else this module's own, stopped at its end."""
    if s3_env_before_ray is not None:
        yield s3_env_before_ray
        return
    with running_s3_server() as env:
        yield env


@pytest.fixture
def s3(s3_server, monkeypatch) -> str:
    """s3:// of a new, empty bucket, with the server's endpoint and credentials in this test's environment."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return f"s3://{create_bucket(s3_server)}"


def test_an_uploaded_directory_comes_back_from_s3_byte_for_byte_under_its_own_name(s3, tmp_path):
    local = make_stage_dir(tmp_path / "out" / "sft")
    upload_dir(local, f"{s3}/store/sft")

    copy = Path(local_copy(f"{s3}/store/sft"))
    assert copy.name == "sft" and copy.parent.parent == cache_dir()
    assert tree(copy) == tree(local)  # S3's directory markers (keys ending in '/') come back as directories only
    one = Path(local_copy(f"{s3}/store/sft/adapter/adapter_model.safetensors"))
    assert one.name == "adapter_model.safetensors" and one.read_bytes() == bytes(range(256)) * 40


def test_a_cached_copy_from_s3_is_reused_without_downloading_again(s3, tmp_path, monkeypatch):
    check_a_cached_copy_is_reused(f"{s3}/store", tmp_path, monkeypatch)


def test_a_stage_uploaded_again_to_s3_with_files_of_the_same_sizes_is_downloaded_again(s3, tmp_path):
    """A re-trained model has the same file sizes as the old one, and S3 keeps modification times to the
    second: the copy is told apart by the time of the upload."""
    local = make_stage_dir(tmp_path / "out" / "sft")
    upload_dir(local, f"{s3}/store/sft")
    old = Path(local_copy(f"{s3}/store/sft"))

    (local / "adapter" / "adapter_model.safetensors").write_bytes(bytes(reversed(range(256))) * 40)
    time.sleep(1.05 - time.time() % 1.0)  # the next upload falls in a later second
    upload_dir(local, f"{s3}/store/sft")
    new = Path(local_copy(f"{s3}/store/sft"))

    assert new != old and tree(new) == tree(local) and tree(old) != tree(new)


def test_uploading_to_s3_replaces_the_stage_whole_and_writes_results_json_last(s3, tmp_path, monkeypatch):
    upload_dir(make_stage_dir(tmp_path / "earlier" / "rm"), f"{s3}/store/rm")
    (tmp_path / "earlier" / "rm" / "stale.bin").write_text("from an earlier run")
    upload_dir(tmp_path / "earlier" / "rm", f"{s3}/store/rm")
    assert storage.exists(f"{s3}/store/rm/stale.bin")
    copies = count_copies(monkeypatch)

    upload_dir(make_stage_dir(tmp_path / "out" / "rm"), f"{s3}/store/rm")

    assert [Path(c).name for c in copies][-1] == "results.json" and len(copies) == 3
    assert not storage.exists(f"{s3}/store/rm/stale.bin")
    assert tree(Path(local_copy(f"{s3}/store/rm"))) == tree(tmp_path / "out" / "rm")


def test_read_text_and_forget_done_on_s3_read_and_remove_only_results_json(s3, tmp_path):
    local = make_stage_dir(tmp_path / "out" / "sft")
    upload_dir(local, f"{s3}/store/sft")

    assert storage.read_text(f"{s3}/store/sft/results.json") == (local / "results.json").read_text()
    assert storage.read_text(f"{s3}/store/sft/nothing.json") is None
    assert storage.read_text(f"{s3}/store/sft/adapter") is None  # a directory is not a file
    storage.forget_done(f"{s3}/store/sft")
    assert storage.read_text(f"{s3}/store/sft/results.json") is None
    assert storage.exists(f"{s3}/store/sft/config.json") and storage.exists(f"{s3}/store/sft/adapter/adapter_model.safetensors")
    storage.forget_done(f"{s3}/store/sft")  # nothing left to remove: no error


def test_a_missing_uri_in_s3_is_an_error_naming_it(s3):
    with pytest.raises(storage.StorageError, match=f"'{s3}/store/nope' does not exist in storage"):
        local_copy(f"{s3}/store/nope")


def test_a_missing_bucket_fails_before_any_stage_naming_storage_and_the_bucket(s3, tmp_path):
    from raylign.cluster.pipeline import run_pipeline

    missing = f"{s3}-missing"
    with pytest.raises(ConfigError) as error:
        run_pipeline(pipeline(tmp_path, f"{missing}/store"))
    message = str(error.value)
    assert f"storage = '{missing}/store' cannot be reached or written" in message
    assert f"Bucket '{missing.removeprefix('s3://')}' not found" in message and "AWS_ENDPOINT_URL" in message
    assert not (tmp_path / "out").exists()
    # An existing bucket is reachable; its storage root is there afterwards.
    storage.check_reachable(f"{s3}/store")
    assert storage.exists(f"{s3}/store")


def test_a_path_inside_a_copy_from_s3_maps_back_to_its_s3_uri(s3, tmp_path):
    upload_dir(make_stage_dir(tmp_path / "out" / "sft"), f"{s3}/store/sft")
    copy = Path(local_copy(f"{s3}/store/sft"))

    assert storage.stored_location(copy) == f"{s3}/store/sft"
    assert storage.stored_location(copy / "adapter" / "adapter_model.safetensors") == f"{s3}/store/sft/adapter/adapter_model.safetensors"


@pytest.mark.slow
@pytest.mark.s3_on_ray  # the actors read the bucket too: the server's address must be in Ray's environment
def test_a_pipeline_with_s3_storage_runs_each_stage_from_the_bucket_alone_and_skips_both_on_rerun(
        ray_session, s3, tmp_path, monkeypatch):
    run_sft_then_rm_from_storage_alone(tmp_path, monkeypatch, f"{s3}/run")
