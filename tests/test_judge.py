"""LLM judge: verdict parsing, tallying both orders, config checks, and the whole path against a real vLLM server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from raylign.actors.judge import (
    JudgeConfig,
    JudgeError,
    UnparseableVerdict,
    judge_win_rate,
    parse_verdict,
    tally_judgments,
)
from raylign.common.statistics import win_rate_ci
from tests.processes import free_port


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("[[A]]", "A"),
        ("After weighing both, my verdict is [[B]].", "B"),
        ("[[tie]]", "tie"),
        ("[[C]]", "tie"),
        ("A", "A"),
        (" **B**\n", "B"),
        ("Tie.", "tie"),
        ("Response A", "A"),
        ("Verdict: B", "B"),
        ("The winner is Response A.", "A"),
        ("Final answer: tie", "tie"),
        ("The verdict is a tie.", "tie"),
        ("Response B is clearly better.", "B"),
        ("Response A is better than answer B", "A"),
    ],
)
def test_parse_verdict_reads_common_judge_replies(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    "reply",
    ["", "a great movie with a twist", "story]]]]]]", "[[A]] or maybe [[B]]", "A better response would be B", "Both are fine"],
)
def test_parse_verdict_refuses_replies_without_exactly_one_verdict(reply):
    with pytest.raises(UnparseableVerdict) as caught:
        parse_verdict(reply)
    assert caught.value.reply == reply


def test_tally_counts_order_disagreement_as_a_tie_and_keeps_unparseable_pairs_out_of_the_rate():
    summary = tally_judgments([
        ("candidate", "candidate"),  # win
        ("candidate", "candidate"),  # win
        ("baseline", "baseline"),  # loss
        ("candidate", "baseline"),  # position bias: tie
        ("tie", "candidate"),  # tie
        ("candidate", "unparseable"),  # out of the rate, counted
    ])
    assert (summary["wins"], summary["losses"], summary["ties"], summary["unparseable_pairs"]) == (2, 1, 2, 1)
    assert summary["judgments"] == {"candidate": 7, "baseline": 3, "tie": 1, "unparseable": 1}
    assert summary["win_rate"] == pytest.approx((2 + 2 / 2) / 5)
    expected = win_rate_ci(2, 1, 2, ties_as="half").interval
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert summary["order_agreement"] == pytest.approx(3 / 5)
    assert summary["outcomes"] == ["win", "win", "loss", "tie", "tie", "unparseable"]


def test_tally_with_no_readable_pair_has_no_rate_and_the_whole_unit_interval():
    summary = tally_judgments([("unparseable", "tie"), ("unparseable", "unparseable")])
    assert summary["win_rate"] is None and summary["order_agreement"] is None
    assert (summary["ci_low"], summary["ci_high"]) == (0.0, 1.0)
    assert summary["unparseable_pairs"] == 2 and summary["judgments"]["unparseable"] == 3


def test_judge_config_refuses_templates_without_the_three_placeholders_and_unknown_keys():
    with pytest.raises(ValidationError, match=r"missing \['answer_b'\]"):
        JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", prompt_template="{prompt} {answer_a}")
    with pytest.raises(ValidationError, match="must start with http"):
        JudgeConfig(base_url="127.0.0.1:8000/v1", model="m")
    with pytest.raises(ValidationError, match="extra"):
        JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key="sk-secret")
    assert JudgeConfig(base_url="http://h:1/v1/", model="m").base_url == "http://h:1/v1"


def test_an_unreachable_endpoint_raises_naming_the_url():
    config = JudgeConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", max_retries=0, timeout=5)
    with pytest.raises(JudgeError, match=r"127\.0\.0\.1.*/v1/chat/completions failed after 1 attempt"):
        judge_win_rate(["p"], ["c"], ["b"], config)


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    """vLLM's OpenAI-compatible server on the tiny Llama, on loopback; always stopped at the end."""
    port = free_port()
    log_path = Path(tmp_path_factory.mktemp("vllm-server")) / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_NO_USAGE_STATS="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_dir,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
    ]
    with open(log_path, "w") as log:
        # Own session, so the engine processes vLLM forks are stopped with the server.
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"vLLM server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready after 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base_url, tiny_model_dir
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


PROMPTS = ["Honestly, the movie was", "Overall, the plot felt", "In my opinion, the cast seemed"]
CANDIDATE = ["great fun from start to end.", "tight and clever.", "warm and funny."]
BASELINE = ["dull.", "slow and long.", "flat."]
SHORT_TEMPLATE = "Which review is better?\nPrompt: {prompt}\nA: {answer_a}\nB: {answer_b}\nAnswer [[A]], [[B]] or [[tie]].\nVerdict:"


@pytest.mark.slow
def test_judge_win_rate_against_a_real_vllm_server_accounts_for_every_judgment(vllm_server):
    base_url, model = vllm_server
    free = JudgeConfig(base_url=base_url, model=model, mode="completions", prompt_template=SHORT_TEMPLATE, max_tokens=8)
    result = judge_win_rate(PROMPTS, CANDIDATE, BASELINE, free)
    # The random model writes gibberish: whatever it says, every one of the 2 x 3 judgments is accounted for.
    assert sum(result["judgments"].values()) == 2 * len(PROMPTS)
    assert result["wins"] + result["losses"] + result["ties"] + result["unparseable_pairs"] == len(PROMPTS)
    assert 0.0 <= result["ci_low"] <= result["ci_high"] <= 1.0
    unparseable = [r for r in result["records"] for order in ("candidate_first", "baseline_first") if r[order] == "unparseable"]
    assert len(unparseable) == result["judgments"]["unparseable"]

    # Constrained to the three labels, every verdict is readable and the interval comes from real counts.
    constrained = free.model_copy(update={"constrain_verdict": True})
    result = judge_win_rate(PROMPTS, CANDIDATE, BASELINE, constrained)
    assert result["judgments"]["unparseable"] == 0 and sum(result["judgments"].values()) == 6
    assert result["wins"] + result["losses"] + result["ties"] == len(PROMPTS)
    expected = win_rate_ci(result["wins"], result["losses"], result["ties"], ties_as="half")
    assert result["win_rate"] == pytest.approx(expected.rate)
    assert 0.0 <= result["ci_low"] < result["ci_high"] <= 1.0


@pytest.mark.slow
def test_judge_errors_from_a_real_server_name_the_cause_and_the_fix(vllm_server):
    base_url, model = vllm_server
    with pytest.raises(JudgeError, match=r"HTTP 404.*judge\.model = 'no-such-model'"):
        judge_win_rate(["p"], ["c"], ["b"], JudgeConfig(base_url=base_url, model="no-such-model", mode="completions"))
    # The tiny model has no chat template.
    with pytest.raises(JudgeError, match=r"HTTP 400.*judge\.mode = 'completions'"):
        judge_win_rate(["p"], ["c"], ["b"], JudgeConfig(base_url=base_url, model=model, mode="chat", max_retries=0))


@pytest.mark.slow
def test_judge_command_pairs_two_runs_by_prompt_and_writes_json(vllm_server, tmp_path):
    from raylign.cluster.judge_cli import judge_main

    base_url, model = vllm_server
    for name, answers in (("candidate", CANDIDATE), ("baseline", BASELINE)):
        rows = [{"prompt": p, "completion": a} for p, a in zip(PROMPTS, answers)]
        rows.append({"prompt": f"only in {name}", "completion": "x"})
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judge.json"
    (tmp_path / "template.txt").write_text(SHORT_TEMPLATE)
    assert judge_main([str(tmp_path / "candidate.jsonl"), str(tmp_path / "baseline.jsonl"), "--base-url", base_url,
                       "--model", model, "--mode", "completions", "--template-file", str(tmp_path / "template.txt"),
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pairs"] == len(PROMPTS)  # the prompt only one run has is not judged
    assert sum(result["judgments"].values()) == 2 * len(PROMPTS)
