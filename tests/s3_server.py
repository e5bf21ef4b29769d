"""A local S3 server (moto, in a thread of the test process) for the tests of `storage: s3://...`: offline, on
127.0.0.1 and a port the OS picks."""

from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager


@contextmanager
def running_s3_server():
    """Start the server; yields the environment that points pyarrow (and boto3) at it: the endpoint,
    made-up credentials and a region. Stops it on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "raylign-test",
            "AWS_SECRET_ACCESS_KEY": "raylign-test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.stop()


def create_bucket(env: dict[str, str]) -> str:
    """A new, empty bucket on the server of `env`; returns its name."""
    import boto3

    name = f"raylign-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=name)
    return name
