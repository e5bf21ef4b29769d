"""Where a pipeline's artefacts live when every node must read them: a directory all nodes see (a shared
filesystem), or a pyarrow.fs URI (s3://bucket/prefix, gs://bucket/prefix, hdfs://host/path, file:///path).

A stage writes node-locally and `upload_dir` copies the finished directory to storage; whoever opens an artefact
calls `local_copy`, which hands a plain path back unchanged and downloads a URI once into a node-local cache.
`stored_location` maps a path inside such a copy back to its URI (what a driver hands to actors on other nodes
after reading its own copy), and `prune_cache` deletes copies no process has asked for in a while.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The schemes pyarrow.fs.FileSystem.from_uri understands (S3 and GCS need their credentials in the environment).
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
# Uploaded last: a stage directory in storage counts as done once this file is there.
DONE_FILE = "results.json"
# What pyarrow's S3 filesystem reads from the environment of each process that opens an s3:// URI.
S3_ENV = "AWS_ENDPOINT_URL (an S3-compatible store), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION"
FIX = ("use a directory every node sees (a shared filesystem path) or a URI pyarrow.fs reads: "
       "s3://bucket/prefix, gs://bucket/prefix, hdfs://host/path or file:///path")
# Ray's workers have the environment their node's Ray started with, not the driver's.
READ_FIX = (f"check the URI, and for S3 that this process has {S3_ENV} in its environment (on a cluster: every "
            f"node, before Ray starts); or {FIX}")


class StorageError(ValueError):
    """A storage location that does not exist or cannot be reached; the message names it and the fix."""


def is_uri(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and URI.match(path) is not None


def check_location(value: str, field: str = "storage") -> None:
    """Refuse a URI whose scheme pyarrow.fs does not read; asks nothing of the network."""
    match = URI.match(value)
    if match is not None and match.group(1).lower() not in SCHEMES:
        raise StorageError(f"{field} = '{value}': pyarrow.fs has no filesystem for '{match.group(1)}://'; {FIX}")
    if not value.strip():
        raise StorageError(f"{field} = '{value}' is empty; {FIX}")
    if match is not None and "?" in value:
        # join() appends each stage's name after the query string, which pyarrow then reads as part of it.
        raise StorageError(
            f"{field} = '{value}': a URI with a query string ('?...') cannot take the stages' paths appended; "
            f"drop it and set the endpoint and credentials in the environment instead (for S3: {S3_ENV})"
        )


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a URI or a directory."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base, *parts))


def filesystem(location: str):
    """(pyarrow filesystem, path inside it) of a URI or a local directory."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError or its own for unknown schemes and bad hosts
        raise StorageError(f"'{location}' cannot be opened ({type(error).__name__}: {error}); {READ_FIX}") from error


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    if not is_uri(location):
        return Path(location).expanduser().exists()
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_exists(location: str, field: str) -> None:
    """ValueError naming `field` when a location in storage does not exist (yet)."""
    if not exists(location):
        raise ValueError(f"{field} = '{location}' does not exist in storage; check the URI (a pipeline stage's "
                         "artefact is there once the stage has finished)")


def check_reachable(location: str, field: str = "storage") -> None:
    """Create the storage root (or see that it is there), so an unreachable store fails before any stage runs."""
    try:
        fs, path = filesystem(location)
        fs.create_dir(path, recursive=True)
    except Exception as error:
        cause = error.__cause__ if isinstance(error, StorageError) and error.__cause__ else error
        raise StorageError(
            f"{field} = '{location}' cannot be reached or written ({type(cause).__name__}: {cause}); check the "
            f"path, the bucket and its credentials (for S3: {S3_ENV} in the environment, or an instance role), or {FIX}"
        ) from error


def upload_dir(local: str | os.PathLike, destination: str) -> None:
    """Replace `destination` (a URI or a directory) by a copy of the directory `local`; its results.json is
    copied last, so a reader never takes a half-uploaded stage for a finished one."""
    import pyarrow.fs as pafs

    source = Path(local)
    if not source.is_dir():
        raise StorageError(f"cannot upload '{local}': it is not a directory")
    fs, root = filesystem(destination)
    fs.create_dir(root, recursive=True)
    fs.delete_dir_contents(root, missing_dir_ok=True)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    files.sort(key=lambda p: p == source / DONE_FILE)
    local_fs = pafs.LocalFileSystem()
    for file in files:
        target = "/".join([root.rstrip("/"), *file.relative_to(source).parts])
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(file.resolve()), target, source_filesystem=local_fs, destination_filesystem=fs)


def raylign_cache_root() -> Path:
    """$XDG_CACHE_HOME/raylign (~/.cache/raylign when unset): raylign's node-local caches."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raylign"


def cache_dir() -> Path:
    return raylign_cache_root() / "storage"


# Each cache entry holds the copy (<entry>/<name>) and this file with the URI it was downloaded from.
SOURCE_FILE = "source-uri"


def local_copy(path: str | os.PathLike) -> str:
    """A path this node can open: a plain path as it is; a URI's file or directory downloaded once into
    cache_dir()/<hash of the URI and its files' sizes and times>/<its name>. A download goes to a temporary
    directory renamed into place when complete, so a half-written copy is never returned, and a copy of
    files that have since changed in storage (a re-run stage) is never reused. Processes of one node that ask
    for the same copy at once download it once: the others wait for it."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return path
    fs, remote = filesystem(path)
    try:
        info = fs.get_file_info(remote)
    except Exception as error:
        raise StorageError(f"'{path}' cannot be read ({type(error).__name__}: {error}); {READ_FIX}") from error
    if info.type == pafs.FileType.NotFound:
        raise StorageError(
            f"'{path}' does not exist in storage; check the URI (for a pipeline artefact: did its stage finish "
            "and upload?)"
        )
    files = [info] if info.type == pafs.FileType.File else [
        f for f in fs.get_file_info(pafs.FileSelector(remote, recursive=True)) if f.type == pafs.FileType.File]
    fingerprint = "\n".join([path, *(f"{f.path} {f.size} {f.mtime_ns}" for f in sorted(files, key=lambda f: f.path))])
    entry = cache_dir() / hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    name = remote.rstrip("/").rsplit("/", 1)[-1] or "root"
    with _download_lock(entry):  # actors on one node opening the same model download it once
        if entry.is_dir() and not (entry / SOURCE_FILE).is_file():
            shutil.rmtree(entry)  # written before entries recorded their URI: stored_location needs it
        if not entry.is_dir():
            _download(fs, remote, info, name, path, entry)
        _touch(entry)  # under the lock: prune_cache re-reads an entry's time under it before deleting
    return str(entry / name)


def _touch(entry: Path) -> None:
    """Mark a cache entry used now (its time is what prune_cache reads). Best effort: a cache on a read-only
    or another user's filesystem is still read, only pruned as if unused."""
    try:
        os.utime(entry)
    except OSError:
        pass


def stored_location(path: str | os.PathLike) -> str:
    """The URI a path inside a `local_copy` download came from (joined with the path below the copy); any
    other path unchanged. A driver reads its node's copy and hands this to actors, which may run elsewhere."""
    given = os.fspath(path)
    if is_uri(given):
        return given
    root = cache_dir().resolve()
    try:
        entry_name, name, *below = Path(given).resolve().relative_to(root).parts
    except ValueError:  # not in the cache, or the cache entry itself
        return given
    source = root / entry_name / SOURCE_FILE
    if name == SOURCE_FILE or not source.is_file():
        return given
    return join(source.read_text().strip(), *below)


def prune_cache(older_than_seconds: float, dry_run: bool = False) -> list[dict]:
    """Delete the downloads no process on this node has asked `local_copy` for in `older_than_seconds`.
    Returns what was (or, with dry_run, would be) deleted: uri, path, bytes, idle days.

    Each entry is checked again and moved out of the way under its download lock, so an entry `local_copy`
    opens meanwhile is kept, and an interrupted delete never leaves a half-empty entry behind (the moved
    one, dot-named, is removed by the next prune). A process still reading a copy it opened longer ago than
    `older_than_seconds` can lose it: prune between runs."""
    root, removed = cache_dir(), []
    if not root.is_dir():
        return removed
    for leftover in root.glob(".*.pruning"):
        shutil.rmtree(leftover, ignore_errors=True)
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        with _download_lock(entry):
            idle = time.time() - entry.stat().st_mtime
            if idle < older_than_seconds:
                continue
            source = entry / SOURCE_FILE
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            removed.append({"uri": source.read_text().strip() if source.is_file() else None, "path": str(entry),
                            "bytes": size, "idle_days": round(idle / 86400, 2)})
            if dry_run:
                continue
            doomed = root / f".{entry.name}.{os.getpid()}.pruning"
            os.rename(entry, doomed)
        shutil.rmtree(doomed)
    return removed


@contextmanager
def _download_lock(entry: Path):
    """An exclusive lock on one cache entry among this node's processes (flock; released if a holder dies)."""
    import fcntl

    locks = entry.parent.parent / "storage-locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{entry.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(fs, remote: str, info, name: str, uri: str, entry: Path) -> None:
    import pyarrow.fs as pafs

    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = entry.parent / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        partial.mkdir()
        local_fs = pafs.LocalFileSystem()
        if info.type == pafs.FileType.File:
            pafs.copy_files(remote, str(partial / name), source_filesystem=fs, destination_filesystem=local_fs)
        else:
            (partial / name).mkdir()
            pafs.copy_files(remote, str(partial / name), source_filesystem=fs, destination_filesystem=local_fs)
        (partial / SOURCE_FILE).write_text(uri + "\n")
        try:
            os.rename(partial, entry)
        except OSError:
            if not entry.is_dir():  # not another process on this node that finished the same download first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def read_text(location: str) -> str | None:
    """The text of a file in storage (a URI or a local path), None when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def forget_done(location: str) -> None:
    """Remove the results.json of a stage in storage, so a stage that starts again counts as not done until it
    is uploaded again (a forced re-run that fails must not leave the old one looking finished)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    done = "/".join([root.rstrip("/"), DONE_FILE])
    if fs.get_file_info(done).type != pafs.FileType.NotFound:
        fs.delete_file(done)


def local_directory(location: str) -> Path | None:
    """The local directory a plain path or a file:// URI names; None for a remote URI."""
    if not is_uri(location):
        return Path(location).expanduser().resolve()
    if location.lower().startswith("file://"):
        return Path(location[len("file://"):]).expanduser().resolve()
    return None
