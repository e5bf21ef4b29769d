import json

import pytest

from raylign.common.data import load_text_column, write_builtin_reviews
from raylign.common.tiny_model import build_tiny_model


def test_builtin_reviews_are_deterministic_and_splits_disjoint(tmp_path):
    first = write_builtin_reviews(tmp_path / "a", seed=0)
    second = write_builtin_reviews(tmp_path / "b", seed=0)
    assert first["prompts"].read_text() == second["prompts"].read_text()
    rows = [json.loads(line) for line in first["prompts"].read_text().splitlines()]
    splits = {name: {r["prompt"] for r in rows if r["split"] == name} for name in ("train", "val", "test")}
    assert [len(splits[name]) for name in ("train", "val", "test")] == [384, 64, 64]
    assert splits["train"].isdisjoint(splits["val"]) and splits["train"].isdisjoint(splits["test"])
    assert splits["val"].isdisjoint(splits["test"])


def test_prompts_load_through_datasets_by_split(tmp_path):
    train = load_text_column("builtin:movie-reviews", "prompt", "train", data_dir=tmp_path)
    val = load_text_column("builtin:movie-reviews", "prompt", "val", data_dir=tmp_path)
    test = load_text_column("builtin:movie-reviews", "prompt", "test", data_dir=tmp_path)
    assert len(train) + len(val) + len(test) == 512
    assert set(train).isdisjoint(test) and set(train).isdisjoint(val) and set(val).isdisjoint(test)


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


def test_prompts_use_the_chat_template_of_instruct_tokenizers(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from raylign.cluster.driver import tokenize_prompts

    plain = tokenize_prompts(tiny_model_dir, ["The movie was"], chat_template=None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert plain == [tokenizer("The movie was").input_ids]
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tokenizer.save_pretrained(tmp_path)
    templated = tokenize_prompts(str(tmp_path), ["The movie was"], chat_template=None)
    assert tokenizer.decode(templated[0]) == "user: The movie was\nassistant:"
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize_prompts(tiny_model_dir, ["x"], chat_template=True)
