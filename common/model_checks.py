"""What a model must offer before a run starts, checked up front so a bad input is one clear message, not a
traceback from deep inside transformers, PEFT or vLLM: a tokenizer, LoRA target modules that exist; and what
it declares: its architecture and how many positions it has.
"""

from __future__ import annotations

import json
from pathlib import Path

from raylign.common.storage import exists, is_uri, join, local_copy, read_text

# Any one of these next to the weights means transformers can load a tokenizer from the directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_has_tokenizer(path: str | Path, field: str) -> None:
    """A local model directory (or one in storage, looked at there) must hold its tokenizer: every actor
    tokenises with the model's own."""
    if is_uri(path):
        lacks = exists(path) and not any(exists(join(path, name)) for name in TOKENIZER_FILES)
    else:
        directory = Path(path).expanduser()
        lacks = directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES)
    if lacks:
        raise ValueError(
            f"{field} = '{path}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it next to the "
            f"weights with tokenizer.save_pretrained('{path}'), e.g. the base model's tokenizer the weights were trained with"
        )


def load_tokenizer(path: str | Path, field: str = "model.path"):
    """`AutoTokenizer.from_pretrained(path)`, with the missing-tokenizer case named. The tokenizer is used as
    saved: raylign never adds a pad token or changes it otherwise."""
    from transformers import AutoTokenizer

    check_has_tokenizer(path, field)
    return AutoTokenizer.from_pretrained(str(local_copy(path)))


def read_model_config(path: str | Path) -> dict | None:
    """config.json of a local model directory or one in storage (read there, nothing downloaded), None for
    anything else (a hub id is read by transformers later)."""
    if is_uri(path):
        text = read_text(join(path, "config.json"))
        return None if text is None else json.loads(text)
    config_file = Path(path).expanduser() / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else None


def model_architecture(path: str) -> str | None:
    """The transformers class a model path declares (config.json `architectures`) for built-in twins and local
    directories; None for a hub id, which is only read when the run starts (`hub_model_architecture`)."""
    from raylign.common.tiny_model import FAMILIES, family_of

    family = family_of(path)
    if family is not None:
        return FAMILIES[family].architecture if family in FAMILIES else None
    config = read_model_config(path)
    if config is None:
        return None
    return (config.get("architectures") or [None])[0]


def hub_model_architecture(path: str) -> str | None:
    """`model_architecture`, reading a hub id's config through transformers (its cache, or the hub)."""
    architecture = model_architecture(path)
    if architecture is not None or is_uri(path) or Path(path).expanduser().exists():
        return architecture
    from transformers import AutoConfig

    return (getattr(AutoConfig.from_pretrained(path), "architectures", None) or [None])[0]


def max_positions(path: str | Path) -> int | None:
    """How many token positions the model has (max_position_embeddings, or GPT-2's n_positions)."""
    config = read_model_config(path)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(local_copy(path))).to_dict()
    text_config = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if text_config.get(key):
            return int(text_config[key])
    return None


def check_lora_targets(path: str | Path, target_modules: list[str] | str, field: str) -> None:
    """Every name in `target_modules` must match at least one layer PEFT can adapt in the model at `path`.

    PEFT only fails when nothing at all matches, and then with its own message; a misspelt name next to a
    correct one would silently adapt fewer layers. The model is built on the meta device: no weights load.
    """
    if target_modules == "all-linear":
        return
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(local_copy(path))))
    adaptable = {name: module for name, module in model.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, Conv1D))}
    unmatched = [target for target in target_modules
                 if not any(check_target_module_exists(LoraConfig(target_modules=[target]), name) for name in adaptable)]
    if unmatched:
        layer_names = sorted({name.rsplit(".", 1)[-1] for name in adaptable})
        raise ValueError(
            f"{field} = {list(target_modules)}: {unmatched} match no layer of {type(model).__name__} at '{path}'; "
            f"its adaptable layers are {layer_names}. Use names from that list, or 'all-linear'"
        )
