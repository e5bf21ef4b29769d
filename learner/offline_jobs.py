"""The offline stages of a pipeline: SFT, reward-model training and DPO, from a stage config to files on disk.

`OfflineTrainer` is a plain class; the pipeline runs it as Ray actors (`resources.num_learners` data-parallel
ranks per stage, like `LearnerWorker`): every rank trains its share of each batch, rank 0 alone writes files.
Each method writes into `output_dir`, which is itself the stage's artefact:

- sft: the fine-tuned causal LM (LoRA merged into the weights; the adapter alone under `adapter/`);
- reward_model: a reward-model directory `load_reward_model(output_dir, type)` reads, and
  `reward_model_mistakes.jsonl` (the validation pairs, or texts, it gets wrong, worst first);
- dpo: the LoRA adapter (PEFT format) on top of the stage's base model;

plus `stage.yaml` (the resolved stage config), `prompts.jsonl` (the prompts of every split, so later stages
can sample RL prompts from a split no earlier stage trained on), `metrics.jsonl` (one row per step) and,
last, `results.json`: its presence marks the stage as done.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml

from raylign.common.builtin_preferences import BUILTIN_DATASETS, load_builtin_examples
from raylign.common.model_checks import check_has_tokenizer, check_lora_targets, load_tokenizer
from raylign.common.pipeline_config import DpoStage, OfflineStage, RewardModelStage, SftStage, StageModelConfig
from raylign.common.preference_data import (
    PreferenceExample,
    declared_test_split,
    hold_out_test,
    load_preference_data,
    prompt_key,
    split_by_prompt,
)
from raylign.common.precision import DTYPES
from raylign.common.prompt_completion import check_chat_template
from raylign.common.reward_models import (
    ClassifierRewardModel,
    ScalarRewardModel,
    SequenceClassificationRewardModel,
    load_reward_model,
)
from raylign.common.storage import local_copy
from raylign.common.tiny_model import family_of, resolve_builtin_model
from raylign.learner import dpo, reward_training, sft
from raylign.learner.data_parallel import SINGLE, Ranks

RESULTS = "results.json"
MISTAKES = "reward_model_mistakes.jsonl"


class OfflineTrainer:
    """Runs as a Ray actor; each method trains one stage and returns its results (also in results.json)."""

    # A worker reset for another run (cluster/warm_actors.py) stays a rank of the group it joined.
    KEPT_ON_RESET = ("ranks",)

    def __init__(self, seed: int, threads: int = 1, use_gpu: bool = False):
        torch.set_num_threads(threads)
        self.seed = seed
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.ranks = SINGLE

    def join_learner_group(self, rank: int, world_size: int, group_name: str) -> int:
        """Become rank `rank` of the stage's data-parallel group (every rank calls this before training)."""
        self.ranks = Ranks.join(rank, world_size, group_name)
        return rank

    @property
    def leader(self) -> bool:
        return self.ranks.rank == 0

    # ----- stages -----

    def sft(self, stage: SftStage, output_dir: str) -> dict:
        """Prompt-masked SFT (full parameters, LoRA or QLoRA); eval loss and perplexity before and after."""
        start, out = time.perf_counter(), self._prepare(output_dir, stage)
        base = self._base_model(stage.model.path, out)
        tokenizer = _tokenizer(base, stage)
        train, held_out = self._splits(stage, out)
        target = sft_target(stage, train)
        chat_template = stage.model.chat_template
        if target == "text":
            train, held_out, chat_template = as_text_examples(train), as_text_examples(held_out), False
        check_stage_chat_template(stage, tokenizer, train + held_out, chat_template)
        model = self._causal_lm(base, stage)
        options = {"batch_size": stage.training.batch_size, "max_length": stage.training.max_length, "chat_template": chat_template}
        before = sft.sft_eval(model, tokenizer, held_out, ranks=self.ranks, **options) if held_out else {}
        history = sft.masked_sft_train(
            model, tokenizer, train, steps=stage.training.steps, learning_rate=stage.training.learning_rate,
            seed=self.seed, eval_examples=held_out, eval_every=stage.training.eval_every,
            max_grad_norm=stage.training.max_grad_norm, ranks=self.ranks, **options,
        )
        if not self.leader:
            return {"rank": self.ranks.rank}
        if stage.model.lora is not None:
            model.save_pretrained(out / "adapter")
            model = self._merged(model, base, stage.model, out / "adapter")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        last = history[-1]
        results = {
            "target": target, "num_train": len(train), "num_eval": len(held_out),
            "loss_first": history[0]["loss"], "loss_last": last["loss"],
            **{f"{key}_before": value for key, value in before.items() if key != "eval/tokens"},
            **{key: last[key] for key in ("eval/loss", "eval/perplexity") if key in last},
        }
        return _finish(out, stage, history, results, start)

    def reward_model(self, stage: RewardModelStage, output_dir: str) -> dict:
        """Bradley-Terry (scalar, seqcls) or classifier training; validation accuracy and the mistakes file."""
        start, out = time.perf_counter(), self._prepare(output_dir, stage)
        base = self._base_model(stage.model.path, out)
        check_has_tokenizer(base, f"stages.{stage.name}.model.path")
        train, held_out = self._splits(stage, out)
        check_rows_fit(stage, train + held_out)
        model = self._reward_model(base, stage).to(self.device)
        tokenizer, t = model.tokenizer, stage.training
        options = {"batch_size": t.batch_size, "max_length": t.max_length}
        common = {"steps": t.steps, "learning_rate": t.learning_rate, "seed": self.seed, "val_examples": held_out,
                  "eval_every": t.eval_every, "max_grad_norm": t.max_grad_norm, "ranks": self.ranks, **options}
        if stage.type == "classifier":
            history = reward_training.train_reward_classifier(model, tokenizer, train, **common)
            if not self.leader:
                return {"rank": self.ranks.rank}
            validation = reward_training.classifier_metrics(model, tokenizer, held_out, **options) if held_out else {}
            mistakes = write_classifier_mistakes(out / MISTAKES, model, held_out, t.batch_size)
        else:
            chat_template = stage.model.chat_template
            check_stage_chat_template(stage, tokenizer, train + held_out, chat_template)
            history = reward_training.train_reward_model(
                model, tokenizer, train, margin=margin_function(stage), center_coef=stage.center_coef,
                chat_template=chat_template, **common,
            )
            if not self.leader:
                return {"rank": self.ranks.rank}
            validation, mistakes = {}, 0
            if held_out:
                chosen, rejected = reward_training.score_pairs(model, tokenizer, held_out, chat_template=chat_template, **options)
                validation = reward_training.pair_metrics(chosen, rejected)
                mistakes = reward_training.write_reward_model_mistakes(out / MISTAKES, held_out, chosen, rejected)
            else:
                (out / MISTAKES).write_text("")
        self._save_reward_model(model, stage, out)
        results = {
            "type": stage.type, "num_train": len(train), "num_eval": len(held_out), "num_mistakes": mistakes,
            "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
            "train_accuracy_last": history[-1]["accuracy"], **validation,
            "reload_max_abs_diff": check_reload(model, stage, out, held_out or train),
        }
        return _finish(out, stage, history, results, start)

    def dpo(self, stage: DpoStage, output_dir: str) -> dict:
        """DPO (or IPO) on a LoRA adapter; the reference is the base model with the adapter disabled."""
        start, out = time.perf_counter(), self._prepare(output_dir, stage)
        base = self._base_model(stage.model.path, out)
        tokenizer = _tokenizer(base, stage)
        train, held_out = self._splits(stage, out)
        check_rows_fit(stage, train + held_out)
        check_stage_chat_template(stage, tokenizer, train + held_out, stage.model.chat_template)
        model = self._causal_lm(base, stage)
        t = stage.training
        history = dpo.dpo_train(
            model, tokenizer, train, steps=t.steps, batch_size=t.batch_size, learning_rate=t.learning_rate,
            max_length=t.max_length, seed=self.seed, beta=stage.beta, loss_type=stage.loss_type,
            val_examples=held_out, eval_every=t.eval_every, chat_template=stage.model.chat_template,
            max_grad_norm=t.max_grad_norm, ranks=self.ranks,
        )
        if not self.leader:
            return {"rank": self.ranks.rank}
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        window = max(1, len(history) // 10)
        reward_keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
        results = {
            "num_train": len(train), "num_eval": len(held_out),
            "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
            # Before the first update policy = reference, so every implicit reward starts at 0.
            **{key: _mean(row[key] for row in history[-window:]) for key in reward_keys},
            **{key: value for key, value in history[-1].items() if key.startswith("eval/")},
        }
        return _finish(out, stage, history, results, start)

    # ----- helpers -----

    def _prepare(self, output_dir: str, stage: OfflineStage) -> Path:
        out = Path(output_dir)
        if self.leader:
            out.mkdir(parents=True, exist_ok=True)
            (out / "stage.yaml").write_text(yaml.safe_dump(stage.model_dump(mode="json"), sort_keys=False))
        return out

    def _base_model(self, path: str, out: Path) -> str:
        """A built-in tiny model is built into the stage directory (by rank 0; the others wait for it and read
        it there); other paths pass through."""
        if family_of(path) is None:
            return local_copy(path)
        if self.leader:
            resolve_builtin_model(path, out / "base_model", self.seed)
        self.ranks.barrier()
        return str(out / "base_model")

    def _splits(self, stage: OfflineStage, out: Path) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
        """The stage's train and validation rows, and prompts.jsonl with the prompts of every split."""
        data, where = stage.data, f"stages.{stage.name}.data"
        examples, test = load_stage_test_split(stage, load_stage_examples(stage))
        splits = split_by_prompt(examples, data.fractions, fixed=None if test is None else {"test": test})
        if self.leader:
            write_split_prompts(out / "prompts.jsonl", splits)
        train = splits[data.train_split]
        if not train:
            raise ValueError(
                f"{where}: split '{data.train_split}' is empty ({len(examples)} rows read from '{data.source}'); "
                f"raise {where}.max_rows or {where}.fractions.{data.train_split}"
            )
        if data.eval_split is None:
            return train, []
        held_out = splits[data.eval_split][: data.max_eval_rows]
        if not held_out:
            raise ValueError(
                f"{where}: eval split '{data.eval_split}' is empty ({len(examples)} rows read); raise {where}.max_rows or "
                f"{where}.fractions.{data.eval_split}, or set {where}.eval_split=null to train without validation"
            )
        return train, held_out

    def _causal_lm(self, base: str, stage: OfflineStage):
        """The policy to train: full weights, or a LoRA adapter on full-precision or 4-bit (QLoRA) weights."""
        from transformers import AutoModelForCausalLM

        spec = stage.model
        dtype = DTYPES[spec.dtype]
        if spec.quantization is not None:
            from peft import prepare_model_for_kbit_training

            compute_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
            quantization = sft.qlora_quantization_config(
                field=f"stages.{stage.name}.model.quantization", value=spec.quantization, compute_dtype=compute_dtype,
            )
            model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization, dtype=compute_dtype,
                                                         device_map={"": self.device.index or 0})
            model = prepare_model_for_kbit_training(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(self.device)
        if spec.lora is None:
            return model
        from peft import get_peft_model

        torch.manual_seed(self.seed)
        return get_peft_model(model, peft_lora_config(stage, base, "CAUSAL_LM"))

    def _merged(self, model, base: str, spec: StageModelConfig, adapter_dir: Path):
        """The LoRA adapter merged into the base weights: in place, or (QLoRA) onto a full-precision reload,
        since merging into 4-bit weights would round the update away."""
        if spec.quantization is None:
            return model.merge_and_unload()
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        dtype = DTYPES[spec.dtype] if spec.dtype != "float32" else torch.bfloat16
        del model
        full = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        return PeftModel.from_pretrained(full, str(adapter_dir)).merge_and_unload()

    def _reward_model(self, base: str, stage: RewardModelStage):
        from peft import get_peft_model

        spec, max_length = stage.model, stage.training.max_length
        torch.manual_seed(self.seed)
        if stage.type == "classifier":
            return ClassifierRewardModel.from_base(base, dtype=spec.dtype, max_length=max_length, dropout=stage.classifier_dropout)
        if stage.type == "scalar":
            model = ScalarRewardModel.from_base(base, dtype=spec.dtype, max_length=max_length)
            if spec.lora is not None:
                model.backbone = get_peft_model(model.backbone, peft_lora_config(stage, base, "FEATURE_EXTRACTION"))
            return model
        from transformers import AutoModelForSequenceClassification

        body = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=DTYPES[spec.dtype])
        model = SequenceClassificationRewardModel(body, _tokenizer(base, stage), max_length=max_length)
        if spec.lora is not None:
            # SEQ_CLS keeps the new score head trainable next to the adapter.
            model.model = get_peft_model(model.model, peft_lora_config(stage, base, "SEQ_CLS"))
        return model.train()

    def _save_reward_model(self, model, stage: RewardModelStage, out: Path) -> None:
        """Save in the form load_reward_model reads: a LoRA adapter is merged (and kept under adapter/)."""
        if stage.model.lora is not None:
            if stage.type == "seqcls":
                model.model.save_pretrained(out / "adapter")
                model.model = model.model.merge_and_unload()
            else:
                model.backbone.save_pretrained(out / "adapter")
                model.backbone = model.backbone.merge_and_unload()
        model.save_pretrained(out)


# ----- data -----


def load_stage_examples(stage: OfflineStage) -> list[PreferenceExample]:
    data = stage.data
    if data.source in BUILTIN_DATASETS:
        return load_builtin_examples(data.source, data.max_rows)
    return load_preference_data(data.source, data.format, data.split, columns=data.columns or None, max_rows=data.max_rows)


def load_stage_test_split(stage: OfflineStage, examples: list[PreferenceExample]) -> tuple[list[PreferenceExample], list[PreferenceExample] | None]:
    """(training rows, test rows or None): the source's own test split, or a hash hold-out of `examples`."""
    data = stage.data
    if data.test_split is None:
        return examples, None
    split = declared_test_split(data.source, data.format) if data.test_split == "auto" else data.test_split
    if split is None or data.source in BUILTIN_DATASETS:
        return hold_out_test(examples, data.test_fraction)
    test = load_preference_data(data.source, data.format, split, columns=data.columns or None, max_rows=data.max_test_rows)
    if not test:
        raise ValueError(
            f"stages.{stage.name}.data.test_split = '{data.test_split}': split '{split}' of '{data.source}' has no rows; "
            f"name the source's test split, or set test_split=auto"
        )
    return examples, test


def write_split_prompts(path: Path, splits: dict[str, list[PreferenceExample]]) -> None:
    """Distinct non-empty prompts per split as {prompt, split} lines (plus `category` where the rows have one):
    RL and evaluate stages read it as `data.prompts`."""
    with path.open("w") as f:
        for name, rows in splits.items():
            seen = set()
            for example in rows:
                key = prompt_key(example.split_prompt)
                if key and key not in seen:
                    seen.add(key)
                    row = {"prompt": example.split_prompt, "split": name}
                    if example.extra.get("category") is not None:
                        row["category"] = example.extra["category"]
                    f.write(json.dumps(row) + "\n")


def sft_target(stage: SftStage, rows: list[PreferenceExample]) -> str:
    if stage.target == "text":
        return "text"
    has_chosen = all(row.chosen is not None for row in rows)
    if stage.target == "chosen" and not has_chosen:
        raise ValueError(
            f"stages.{stage.name}.target = 'chosen', but rows of '{stage.data.source}' have no chosen completion; "
            "set target: text (train on the whole text) or use a data set with completions"
        )
    return "chosen" if has_chosen else "text"


def as_text_examples(rows: list[PreferenceExample]) -> list[PreferenceExample]:
    """Whole texts as completions of an empty prompt, so the loss covers every token of the text."""
    return [PreferenceExample(prompt="", chosen=reward_training.classifier_text(row)) for row in rows]


def check_rows_fit(stage: RewardModelStage | DpoStage, rows: list[PreferenceExample]) -> None:
    where = f"stages.{stage.name}"
    if isinstance(stage, RewardModelStage) and stage.type == "classifier":
        if any(row.label is None for row in rows):
            raise ValueError(
                f"{where}.data.source = '{stage.data.source}' has rows without a label; a classifier reward model trains "
                "on labelled text (imdb, builtin:movie-sentiment); use type: scalar for chosen/rejected pairs"
            )
        return
    if any(row.chosen is None or row.rejected is None for row in rows):
        fix = "type: classifier for labelled text" if isinstance(stage, RewardModelStage) else "a preference data set"
        raise ValueError(
            f"{where}.data.source = '{stage.data.source}' has rows without chosen and rejected completions; "
            f"{stage.kind} trains on preference pairs (hh-rlhf, ultrafeedback, orca, builtin:movie-preferences); use {fix}"
        )


def margin_function(stage: RewardModelStage):
    if stage.margin != "score_gap":
        return stage.margin

    def score_gap(example: PreferenceExample) -> float:
        if "score_chosen" not in example.extra or "score_rejected" not in example.extra:
            raise ValueError(
                f"stages.{stage.name}.margin = 'score_gap' needs score_chosen and score_rejected in every row "
                "(UltraFeedback has them); set margin to a number or null"
            )
        return float(example.extra["score_chosen"]) - float(example.extra["score_rejected"])

    return score_gap


# ----- reward-model checks and files -----


def write_classifier_mistakes(path: Path, model, rows: list[PreferenceExample], batch_size: int) -> int:
    """The validation texts the classifier gets wrong, most confidently wrong first: prompt, text, label, p_positive."""
    texts = [reward_training.classifier_text(row) for row in rows]
    probabilities = model.score_texts(texts, batch_size=batch_size) if rows else []
    wrong = [i for i, p in enumerate(probabilities) if (p > 0.5) != bool(rows[i].label)]
    wrong.sort(key=lambda i: -abs(probabilities[i] - rows[i].label))
    with path.open("w") as f:
        for i in wrong:
            f.write(json.dumps({"prompt": rows[i].prompt, "text": texts[i], "label": rows[i].label,
                                "p_positive": probabilities[i]}) + "\n")
    return len(wrong)


def check_reload(model, stage: RewardModelStage, out: Path, rows: list[PreferenceExample], count: int = 8) -> float:
    """Load the saved reward model the way the reward actor will and compare its scores with the trained model's.
    A mismatch means the artefact is not the model that was validated, so the stage fails."""
    texts = [reward_training.classifier_text(row) if stage.type == "classifier" else f"{row.prompt} {row.chosen}"
             for row in rows[:count]]
    reloaded = load_reward_model(out, stage.type, dtype=stage.model.dtype).to(model.device)
    diff = max(abs(a - b) for a, b in zip(model.score_texts(texts), reloaded.score_texts(texts)))
    tolerance = 1e-3 if stage.model.dtype == "float32" else 5e-2
    if diff > tolerance:
        raise RuntimeError(
            f"stages.{stage.name}: the saved reward model scores differ from the trained one by {diff:.3g} (> {tolerance}); "
            f"the files in {out} do not hold the trained weights"
        )
    return diff


# ----- shared -----


def peft_lora_config(stage: OfflineStage, base: str, task_type: str):
    """The stage's LoRA config for PEFT, once its target modules are known to exist in the base model."""
    from peft import LoraConfig

    lora = stage.model.lora
    check_lora_targets(base, lora.target_modules, f"stages.{stage.name}.model.lora.target_modules")
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      task_type=task_type)


def _tokenizer(path: str, stage: OfflineStage):
    return load_tokenizer(path, f"stages.{stage.name}.model.path")


def check_stage_chat_template(stage: OfflineStage, tokenizer, rows: list[PreferenceExample], chat_template: bool | None) -> None:
    """The stage's conversations render with the tokenizer's chat template, before any training starts."""
    check_chat_template(tokenizer, (row.prompt_messages() + [{"role": "assistant", "content": "."}] for row in rows),
                        chat_template, f"stages.{stage.name}.model.chat_template")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _finish(out: Path, stage: OfflineStage, history: list[dict], results: dict, start: float) -> dict:
    """metrics.jsonl, then results.json (written last, atomically: it marks the stage as done)."""
    with (out / "metrics.jsonl").open("w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    results = {"stage": stage.name, "kind": stage.kind, "artefact": str(out.resolve()), "steps": len(history),
               **results, "seconds": time.perf_counter() - start}
    partial = out / (RESULTS + ".partial")
    partial.write_text(json.dumps(results, indent=2))
    os.replace(partial, out / RESULTS)
    return results
