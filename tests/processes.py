"""Helpers for tests that start servers in child processes: free loopback ports, and stopping a child."""

from __future__ import annotations

import contextlib
import socket
import subprocess


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 when asked (another process could take one before it is bound)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
