import json
import math

from raylign.common.run_logging import RunLogger
from raylign.common.types import Sample


def test_run_logger_writes_jsonl_and_an_offline_wandb_run(tmp_path):
    logger = RunLogger(tmp_path, {"seed": 0}, use_wandb=True, wandb_project="raylign-test", wandb_mode="offline")
    logger.log_metrics({"step": 0, "reward_mean": 0.5, "kl": math.nan, "kl_placement": "loss"})
    sample = Sample(prompt_index=0, sample_index=0, prompt="p", prompt_ids=[1], completion="c", completion_ids=[2],
                    behaviour_logprobs=[-0.1], policy_version=3, finish_reason="stop", reward=0.25)
    logger.log_samples(0, [sample, sample], limit=1)
    logger.log_reward_errors(0, [{"index": 1, "source": "fn", "error": "ValueError: bad"}])
    logger.close()

    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 0, "reward_mean": 0.5, "kl": None, "kl_placement": "loss"}  # NaN becomes null: valid JSON
    ]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 1 and samples[0]["policy_version"] == 3 and samples[0]["reward"] == 0.25
    errors = [json.loads(line) for line in (tmp_path / "reward_errors.jsonl").read_text().splitlines()]
    assert errors == [{"step": 0, "index": 1, "source": "fn", "error": "ValueError: bad"}]
    assert list((tmp_path / "wandb").glob("offline-run-*"))
