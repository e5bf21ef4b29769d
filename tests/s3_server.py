"""A local S3 server (moto, in a child process) for the tests of `storage: s3://...`: offline, on 127.0.0.1.

A child process, not a thread: moto's server is a Flask app, and once Flask is imported into the test process
an in-process vLLM engine fails to start (vLLM 0.32's CPU platform walks every module's globals at start-up and
trips over Flask's `current_app` proxy, which raises RuntimeError outside an application context)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager

from tests.processes import free_port, stop_process


def _wait_until_listening(port: int, server: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto's S3 server exited with status {server.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto's S3 server did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


@contextmanager
def running_s3_server():
    """Start the server; yields the environment that points pyarrow (and boto3) at it: the endpoint,
    made-up credentials and a region. Stops it on exit."""
    port = free_port()  # free when asked; another process could take it before moto binds it (then: an error)
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            _wait_until_listening(port, server)
        except RuntimeError as error:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{error}; its output ends:\n{tail}") from None
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "raylign-test",
            "AWS_SECRET_ACCESS_KEY": "raylign-test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        stop_process(server, timeout_s=10)
        log.close()


def create_bucket(env: dict[str, str]) -> str:
    """A new, empty bucket on the server of `env`; returns its name."""
    import boto3

    name = f"raylign-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=name)
    return name
