import json

import pytest
import torch

from raylign.common.data import load_text_column, write_builtin_reviews
from raylign.common.tiny_model import build_tiny_model


def test_builtin_reviews_are_deterministic_and_splits_disjoint(tmp_path):
    first = write_builtin_reviews(tmp_path / "a", seed=0)
    second = write_builtin_reviews(tmp_path / "b", seed=0)
    assert first["prompts"].read_text() == second["prompts"].read_text()
    rows = [json.loads(line) for line in first["prompts"].read_text().splitlines()]
    train = {r["prompt"] for r in rows if r["split"] == "train"}
    test = {r["prompt"] for r in rows if r["split"] == "test"}
    assert len(train) > 300 and len(test) > 40
    assert train.isdisjoint(test)


def test_prompts_load_through_datasets_by_split(tmp_path):
    train = load_text_column("builtin:movie-reviews", "prompt", "train", data_dir=tmp_path)
    test = load_text_column("builtin:movie-reviews", "prompt", "test", data_dir=tmp_path)
    assert len(train) + len(test) == 512
    assert set(train).isdisjoint(test)


def test_missing_column_names_the_fix(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "hi"}\n')
    with pytest.raises(ValueError, match="column 'prompt' not found.*question"):
        load_text_column(str(path), "prompt")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_model_saves_and_reloads_with_vllm_compatible_head_dim(arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path / arch, arch=arch)
    config = AutoConfig.from_pretrained(path)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    assert hidden // heads >= 32
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer("The movie was great.", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "The movie was great."
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
