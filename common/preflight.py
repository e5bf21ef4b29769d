"""Pre-flight: what a user can get wrong in a run, checked on the driver before Ray starts or reserves anything.

Each check raises ValueError naming the field, the value and the fix; the driver turns it into ConfigError,
which `raylign train` prints as one message with exit status 2. These checks load no weights and start
nothing. Right after them, still before Ray, the driver builds a built-in model, plans the rollout engine and
fits every prompt set to the prompt budget (`cluster/driver.py` `read_inputs`), so a prompt that cannot fit
with its completion, or a tokenizer without the chat template asked for, is refused there, also before Ray.
"""

from __future__ import annotations

from pathlib import Path

from raylign.common.config import RewardConfig, RunConfig
from raylign.common.data import BUILTIN_REVIEWS, load_text_column
from raylign.common.prompt_budget import PromptLimit
from raylign.common.storage import check_exists, is_uri

LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


def check_run_inputs(config: RunConfig, data_dir: Path) -> None:
    """Every pre-flight check of a run; `data_dir` is where the built-in data is written (output_dir/data)."""
    check_data_source(config.data.prompts, "data.prompts")
    if config.sft.steps > 0:
        check_data_source(config.sft.data, "sft.data")
    check_reward_functions(config.reward)
    check_completion_length(config)
    check_prompt_splits(config, data_dir)


def check_data_source(source: str, field: str) -> None:
    """A built-in name must be known and a local file must exist; hub dataset names are looked up when loaded."""
    if source.startswith("builtin:"):
        if source != BUILTIN_REVIEWS:
            raise ValueError(f"{field} = '{source}' is not a built-in data set; use '{BUILTIN_REVIEWS}', a local "
                             ".json/.jsonl file or a hub dataset name")
        return
    if is_uri(source):
        check_exists(source, field)
        return
    if Path(source).expanduser().exists():
        return
    if source.endswith(LOCAL_DATA_SUFFIXES) or source.startswith((".", "/", "~")):
        raise ValueError(f"{field} = '{source}' does not exist; give an existing .json/.jsonl file (one JSON object "
                         f"per line), a hub dataset name, or '{BUILTIN_REVIEWS}'")


def check_reward_functions(reward: RewardConfig) -> None:
    """Every reward function resolves here as it will in the reward actors: a registered name, or a
    'module.path:function' that imports and takes the options given. (Reward-model paths are checked by the config.)"""
    from raylign.actors.reward_worker import source_locations
    from raylign.actors.rewards import build_source

    for source, (field, name_field) in zip(reward.resolved_sources(), source_locations(reward)):
        if not source.is_reward_model:
            build_source(source, field=field, name_field=name_field)


def check_completion_length(config: RunConfig) -> None:
    """rollout.max_new_tokens (and rollout.max_model_len) must fit the model's positions, when they are known
    without loading anything (a built-in twin or a local directory); the prompt budget refuses the rest."""
    positions = known_positions(config.model.path)
    rollout = config.rollout
    PromptLimit.of(config.data.max_prompt_tokens, rollout.max_model_len, rollout.max_new_tokens, positions)


def known_positions(model_path: str) -> int | None:
    from raylign.common.model_checks import max_positions, read_model_config
    from raylign.common.tiny_model import FAMILIES, family_of

    family = family_of(model_path)
    if family is not None:
        return FAMILIES[family].max_positions
    return max_positions(model_path) if read_model_config(model_path) is not None else None


def check_prompt_splits(config: RunConfig, data_dir: Path) -> None:
    """The prompt column exists, the training split holds at least a step's prompts, and the validation and
    test splits exist when evaluation is on; the SFT corpus has its text column."""
    data, evaluation = config.data, config.eval
    train = load_text_column(data.prompts, data.prompt_field, data.split, data_dir=data_dir)[: data.max_prompts]
    if not train:
        raise ValueError(f"data.split = '{data.split}': data.prompts = '{data.prompts}' has no prompts in that split; "
                         "set data.split to a split the data has (rows are filtered by their 'split' column)")
    if config.train.prompts_per_step > len(train):
        raise ValueError(
            f"train.prompts_per_step = {config.train.prompts_per_step} exceeds the {len(train)} prompts of "
            f"data.prompts = '{data.prompts}' (split '{data.split}'), so every step would repeat prompts; set "
            f"train.prompts_per_step={len(train)} or less, or give more prompts"
        )
    splits = [("eval.val_split", evaluation.val_split, evaluation.every > 0),
              ("eval.test_split", evaluation.test_split, evaluation.run_test)]
    for field, split, used in splits:
        if used and not load_text_column(data.prompts, data.prompt_field, split, data_dir=data_dir):
            raise ValueError(
                f"{field} = '{split}': data.prompts = '{data.prompts}' has no prompts in that split; give the data "
                f"a 'split' column with '{split}' rows, set {field} to a split it has, or turn evaluation off "
                "(eval.every=0, eval.run_test=false)"
            )
    if config.sft.steps > 0:
        load_text_column(config.sft.data, config.sft.text_field, data_dir=data_dir)
