"""`ray job submit` on a real Ray head on loopback: the README's cluster command, run as written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import free_ports, stop_process

REPO = Path(__file__).resolve().parents[1]
HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 600  # the job takes about a minute on 2 cores


def readme_job_submit_block() -> str:
    """The README's ```bash block that holds `ray job submit`, verbatim."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    submits = [block for block in blocks if "ray job submit" in block]
    assert len(submits) == 1, f"README.md should have one ```bash block with `ray job submit`, found {len(submits)}"
    return submits[0]


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks), from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name in parentheses may hold spaces; the fields after it are fixed.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int) -> dict[int, int]:
    """Every live process below `pid`, with its start time (so a pid reused later is not mistaken for it).
    Ray's workers re-title themselves `ray::…`: only the process tree says which head they belong to."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, stack = {}, [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found[child] = table[child][1]
            stack.append(child)
    return found


def ray_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


@dataclass
class Head:
    url: str  # the dashboard, where `ray job` commands go
    env: dict[str, str]  # for the `ray` CLI: this head's token, none of the test session's RAY_* variables
    token: str

    def get(self, path: str) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@contextlib.contextmanager
def ray_head(num_cpus: int):
    """A Ray head of its own on 127.0.0.1: its own ports, temp dir and auth token, so it shares nothing with
    the test session's `ray.init`. Stops only what it started (`ray stop` would stop every Ray on the
    machine): `ray start --block` tears its node down on SIGTERM, then any straggler of its tree is killed."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))  # short: Ray's socket paths live under it
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0")
    gcs, dashboard, agent_http, agent_grpc, client, node_manager, object_manager, runtime_env_agent, metrics = free_ports(9)
    command = [
        "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", str(num_cpus),
        "--temp-dir", str(temp_dir), "--object-store-memory", str(256 * 2**20),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--ray-client-server-port", str(client), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager), "--runtime-env-agent-port", str(runtime_env_agent),
        "--metrics-export-port", str(metrics), "--min-worker-port", "0", "--max-worker-port", "0",  # 0: any free port
    ]
    head_log = temp_dir / "ray_start.log"
    with open(head_log, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard}", env, token_file.read_text())
    try:
        wait_for_dashboard(head, process, head_log)
        yield head
    finally:
        tree = descendants(process.pid)
        stop_process(process, timeout_s=60)
        alive = process_table()
        for pid, started in tree.items():
            if pid in alive and alive[pid][1] == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_dashboard(head: Head, process: subprocess.Popen, head_log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ray start exited with {process.returncode}:\n{head_log.read_text()[-3000:]}"
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            head.get("/api/version")
            return
        time.sleep(1)
    raise AssertionError(f"the dashboard at {head.url} did not answer within {HEAD_START_TIMEOUT_S} s:\n"
                         f"{head_log.read_text()[-3000:]}")


@pytest.mark.slow
def test_readme_job_submit_trains_the_quickstart_on_a_ray_head(tmp_path):
    block = readme_job_submit_block()
    steps = re.search(r"\btrain\.steps=(\d+)", block)
    assert steps, f"the README's job submit block should set train.steps (the test counts them):\n{block}"
    steps = int(steps.group(1))
    run_dir = tmp_path / "run"
    with ray_head(num_cpus=4) as head:
        try:
            submitted = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=REPO, capture_output=True, text=True,
                                       env={**head.env, "RAY_DASHBOARD": head.url, "RUN_DIR": str(run_dir)},
                                       timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired as timeout:
            for job_id in set(re.findall(r"raysubmit_\w+", str(timeout.stdout))):
                ray_cli(["job", "stop", "--address", head.url, job_id], head.env)
            raise
        output = submitted.stdout + submitted.stderr
        job_ids = set(re.findall(r"raysubmit_\w+", output))
        assert len(job_ids) == 1, output[-5000:]
        [job_id] = job_ids
        job = head.get(f"/api/jobs/{job_id}")
        logs = ray_cli(["job", "logs", "--address", head.url, job_id], head.env)
    assert submitted.returncode == 0, output[-5000:]
    assert job["status"] == "SUCCEEDED", job
    assert job["entrypoint"].startswith("raylign train configs/quickstart.yaml cluster.address=auto"), job["entrypoint"]
    assert logs.returncode == 0, logs.stderr
    assert f"done: {steps} steps" in logs.stdout, logs.stdout[-5000:]
    assert f"outputs in {run_dir}" in logs.stdout, logs.stdout[-5000:]

    # The job wrote where RUN_DIR points, not into its copy of the working directory.
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == steps
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(steps))
    assert [m["policy_version"] for m in metrics] == list(range(1, steps + 1))
    assert all(-1.0 <= m["reward_mean"] <= 1.0 for m in metrics), metrics  # VADER compound scores
    assert (run_dir / "sft_model" / "model.safetensors").is_file()


def test_a_jobs_env_vars_win_over_raylign_worker_defaults(monkeypatch):
    import ray

    from raylign.cluster import ray_setup
    from raylign.cluster.pipeline import start_pipeline_ray
    from raylign.common.config import load_config
    from raylign.common.pipeline_config import load_pipeline_config

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    # What Ray's job supervisor hands the entrypoint of `ray job submit --runtime-env-json '{"env_vars": ...}'`.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0.zip", "env_vars": {"VLLM_LOGGING_LEVEL": "DEBUG"}}}))
    ray_setup.start_ray(load_config(str(REPO / "configs/quickstart.yaml"), ["cluster.address=auto"]))
    # A pipeline submitted as a job joins the same way (cluster/pipeline.py start_pipeline_ray).
    start_pipeline_ray(load_pipeline_config(str(REPO / "configs/pipelines/gpt2_hh_rlhf_tiny.yaml"), ["cluster.address=auto"]))

    assert len(calls) == 2
    for call in calls:
        assert call["address"] == "auto"
        # Ray refuses a variable set by both the job and ray.init; the job's own value is the one workers get.
        assert "VLLM_LOGGING_LEVEL" not in call["runtime_env"]["env_vars"]
        assert call["runtime_env"]["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"


def test_a_run_without_cluster_address_starts_its_own_ray_even_beside_a_running_head(monkeypatch):
    """ray.init() without an address joins RAY_ADDRESS or the last `ray start` head on the machine (and then
    refuses num_cpus): raylign's local start asks for a new instance."""
    import ray

    from raylign.cluster import ray_setup
    from raylign.cluster.pipeline import start_pipeline_ray
    from raylign.common.config import load_config
    from raylign.common.pipeline_config import load_pipeline_config

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ray_setup.start_ray(load_config(str(REPO / "configs/quickstart.yaml")))
    start_pipeline_ray(load_pipeline_config(str(REPO / "configs/pipelines/gpt2_hh_rlhf_tiny.yaml")))
    assert [call["address"] for call in calls] == ["local", "local"] and all(call["num_cpus"] >= 1 for call in calls)
