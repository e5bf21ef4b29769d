"""Validation during training and the one final test evaluation.

Every method is evaluated the same way: the rollout actors sample hard text
with the published adapter, the reward actor scores it (without touching the
running normalisation), and the learner estimates KL to the reference on the
same samples.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import ray

from raylign.cluster.prompts import PromptEncoder
from raylign.common.config import RunConfig
from raylign.common.data import load_text_column
from raylign.common.eval_metrics import distinct_n, pass_at_k, self_bleu
from raylign.common.types import PromptItem, Sample, SamplingSettings

EVAL_SEED_OFFSET = 1_000_000_007


@dataclass
class EvalPrompts:
    """The fixed validation and test prompts of a run, and each prompt's category (data.category_field)."""

    val: list[PromptItem] = field(default_factory=list)
    test: list[PromptItem] = field(default_factory=list)
    categories: dict[str, str] = field(default_factory=dict)  # prompt text -> category


def load_eval_prompts(config: RunConfig, output_dir: Path, encoder: PromptEncoder) -> EvalPrompts:
    """Validation and test prompts (disjoint from each other and from training), fitted to the run's prompt budget."""
    data, eval_config = config.data, config.eval
    if not (eval_config.every or eval_config.run_test):
        return EvalPrompts()
    data_dir = output_dir / "data"
    train = set(load_text_column(data.prompts, data.prompt_field, data.split, data_dir=data_dir))
    val = load_text_column(data.prompts, data.prompt_field, eval_config.val_split, data_dir=data_dir)[: eval_config.val_samples]
    test = load_text_column(data.prompts, data.prompt_field, eval_config.test_split, data_dir=data_dir)[: eval_config.test_samples]
    overlap = (set(val) & set(test)) | (set(val) & train) | (set(test) & train)
    if overlap:
        raise ValueError(
            f"eval: {len(overlap)} prompts appear in more than one of the splits '{data.split}', "
            f"'{eval_config.val_split}', '{eval_config.test_split}' of data.prompts = '{data.prompts}' "
            f"(e.g. {sorted(overlap)[0]!r}); give the data a 'split' column with disjoint splits, "
            "or set eval.every=0 and eval.run_test=false"
        )
    prompts = EvalPrompts()
    if data.category_field is not None:
        for split, texts in ((eval_config.val_split, val), (eval_config.test_split, test)):
            labels = load_text_column(data.prompts, data.category_field, split, data_dir=data_dir)[: len(texts)]
            prompts.categories.update(zip(texts, labels))
    prompts.val = _items(encoder, val, eval_config.val_split, offset=0)
    prompts.test = _items(encoder, test, eval_config.test_split, offset=len(val))
    return prompts


def _items(encoder: PromptEncoder, texts: list[str], split: str, offset: int) -> list[PromptItem]:
    fitted = encoder.encode(texts, split)
    # Fixed seeds: every evaluation of every method sees the same prompts with the same noise.
    return [PromptItem(index=i, text=texts[k], token_ids=ids, seed=(EVAL_SEED_OFFSET + offset + k) % (2**31 - 1),
                       truncated=truncated)
            for i, (k, ids, truncated) in enumerate(zip(fitted.kept, fitted.token_ids, fitted.truncated))]


class Evaluator:
    def __init__(self, config: RunConfig, output_dir: Path, rollouts, rewards, learner, prompts: EvalPrompts):
        self.config, self.output_dir = config, output_dir
        self.rollouts, self.rewards, self.learner = rollouts, rewards, learner
        eval_config = config.eval
        self.settings = SamplingSettings(
            samples_per_prompt=eval_config.samples_per_prompt, max_new_tokens=config.rollout.max_new_tokens,
            min_new_tokens=config.rollout.min_new_tokens, temperature=eval_config.temperature,
        )
        self.val_prompts, self.test_prompts, self.categories = prompts.val, prompts.test, prompts.categories
        self.best_reward: float | None = None
        self.best_step: int | None = None
        self.best_policy = None

    def validation_due(self, step: int) -> bool:
        every = self.config.eval.every
        return bool(every) and ((step + 1) % every == 0 or step + 1 == self.config.train.steps)

    def validate(self, step: int, policy) -> dict:
        """Evaluate the current adapter on the validation prompts; remember the best version."""
        metrics, samples = self._evaluate(self.val_prompts)
        self._write_samples("val_samples.jsonl", step, samples)
        if self.best_reward is None or metrics["reward_mean"] > self.best_reward:
            self.best_reward, self.best_step, self.best_policy = metrics["reward_mean"], step, policy
            best_dir = self.output_dir / "checkpoints" / "best"
            ray.get(self.learner.save_checkpoint.remote(str(best_dir), {"step": step, "val_reward_mean": self.best_reward}))
        return {f"val/{key}": value for key, value in metrics.items()} | {"best_val_reward": self.best_reward}

    def test(self, last_policy) -> dict:
        """The one test evaluation, with the best (by validation) or the last adapter."""
        if not self.config.eval.run_test:
            return {}
        use_best = self.config.eval.test_adapter == "best" and self.best_policy is not None
        policy = self.best_policy if use_best else last_policy
        self.rollouts.publish(policy)
        metrics, samples = self._evaluate(self.test_prompts)
        self._write_samples("test_samples.jsonl", None, samples)
        return {f"test/{key}": value for key, value in metrics.items()} | {
            "test/adapter": f"best (step {self.best_step})" if use_best else "last"
        }

    def restore_best(self, reward: float | None, step: int | None) -> None:
        """After a resume: the best validation result so far. Its adapter is on disk in
        checkpoints/best, so a 'best' test evaluation then uses the last adapter unless a
        better one turns up. An adapter held from before a learner restart is forgotten: it may come from a
        step the restart discarded."""
        self.best_reward, self.best_step, self.best_policy = reward, step, None

    def best_summary(self) -> dict:
        return {} if self.best_reward is None else {"best_val_reward": self.best_reward, "best_val_step": self.best_step}

    def _evaluate(self, prompts: list[PromptItem]) -> tuple[dict, list[Sample]]:
        samples = self.rollouts.generate(prompts, self.settings)
        scored = self.rewards.score_batch(samples, normalize=False)
        for sample, value in zip(samples, scored.raw_rewards or scored.rewards, strict=True):
            sample.reward = value
        valid = [s for s in samples if s.reward is not None]
        if not valid:
            raise RuntimeError(f"evaluation: no sample of {len(samples)} got a valid reward; see reward_errors.jsonl")
        kl = ray.get(self.learner.reference_kl.remote(samples, self.settings.temperature))
        k = self.settings.samples_per_prompt
        # An unscorable sample counts as a failure, not as a missing one.
        per_prompt = [[s.reward if s.reward is not None else float("-inf") for s in samples[i:i + k]]
                      for i in range(0, len(samples), k)]
        texts = [s.completion for s in samples]
        rewards = [s.reward for s in valid]
        return {
            "reward_mean": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards),
            "invalid_count": len(samples) - len(valid),
            "kl": kl["kl"],
            "reference_perplexity": kl["reference_perplexity"],
            "response_length_mean": statistics.fmean(len(s.completion_ids) for s in samples),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "self_bleu": self_bleu(texts),
            f"pass@{k}": pass_at_k(per_prompt, k, self.config.eval.pass_threshold),
            "prompts": len(prompts),
            **self._per_category(valid),
        }, samples

    def _per_category(self, valid: list[Sample]) -> dict[str, float]:
        by_category: dict[str, list[float]] = {}
        for sample in valid:
            if sample.prompt in self.categories:
                by_category.setdefault(self.categories[sample.prompt], []).append(sample.reward)
        return {f"category/{name}/reward_mean": statistics.fmean(rewards) for name, rewards in sorted(by_category.items())}

    def _write_samples(self, name: str, step: int | None, samples: list[Sample]) -> None:
        with (self.output_dir / name).open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, "prompt": s.prompt, "completion": s.completion, "reward": s.reward,
                                    "policy_version": s.policy_version}) + "\n")
