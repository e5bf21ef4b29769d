import json
import time

import pytest

from raylign.common.data import load_text_column, write_builtin_reviews
from raylign.common.tiny_model import FAMILIES, build_tiny_model


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


def test_builtin_twins_build_fast_with_their_architecture_tying_and_vllm_head_dims(twin_dirs, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    for family, path in twin_dirs.items():
        config = AutoConfig.from_pretrained(path)
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        assert (getattr(config, "head_dim", None) or hidden // heads) >= 32, family
        model = AutoModelForCausalLM.from_pretrained(path)
        assert type(model).__name__ == FAMILIES[family].architecture
        assert sum(p.numel() for p in model.parameters()) < 1_000_000, family
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert tied == FAMILIES[family].tie_embeddings, family
    start = time.perf_counter()
    build_tiny_model(tmp_path / "gpt2", family="gpt2")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("family, modules", [
    ("gpt2", {"c_attn", "c_proj", "c_fc"}), ("pythia", {"query_key_value", "dense", "dense_h_to_4h"}),
    ("gemma", {"q_proj", "k_proj", "v_proj", "o_proj"}), ("smollm2", {"q_proj", "v_proj"}),
    ("qwen2", {"q_proj", "v_proj"}), ("qwen3", {"q_proj", "q_norm"}), ("llama", {"q_proj", "v_proj"}),
])
def test_twins_have_their_familys_module_names(family, modules, twin_dirs):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(twin_dirs[family])
    assert modules <= {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if family == "gpt2":
        assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


def test_twin_tokenizers_have_the_real_quirks(twin_dirs):
    from transformers import AutoTokenizer

    text = "The movie was great."
    tokenizers = {family: AutoTokenizer.from_pretrained(path) for family, path in twin_dirs.items()}
    for family in ("gpt2", "pythia"):
        tokenizer = tokenizers[family]
        assert tokenizer.pad_token is None and tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
        assert tokenizer(text).input_ids[0] != tokenizer.bos_token_id  # no BOS added
    gemma = tokenizers["gemma"]
    assert gemma(text).input_ids[0] == gemma.bos_token_id
    rendered = gemma.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(Exception, match="System role not supported"):
        gemma.apply_chat_template([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}], tokenize=False)
    for family in ("smollm2", "qwen2"):
        tokenizer = tokenizers[family]
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        assert rendered.startswith("<|im_start|>system\n")
        assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        assert tokenizer.eos_token == "<|im_end|>"
        assert tokenizer(text).input_ids[0] != tokenizer.bos_token_id
    assert tokenizers["qwen2"].bos_token is None
    assert tokenizers["smollm2"].pad_token_id == tokenizers["smollm2"].eos_token_id  # pads with its EOS
    llama = tokenizers["llama"]
    assert llama.pad_token == "<pad>" and llama(text).input_ids[0] == llama.bos_token_id
    for family, tokenizer in tokenizers.items():
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text, family


def test_prompts_use_the_chat_template_of_instruct_tokenizers(twin_dirs):
    from raylign.cluster.prompts import PromptEncoder
    from raylign.common.config import load_config

    def encoder(model_dir, *overrides):
        return PromptEncoder(load_config("configs/quickstart.yaml", [f"model.path={model_dir}", *overrides]), model_dir)

    plain = encoder(twin_dirs["llama"])
    assert plain.encode(["The movie was"], "train").token_ids == [plain.tokenizer("The movie was").input_ids]
    chat = encoder(twin_dirs["qwen2"])
    assert chat.tokenizer.decode(chat.encode(["The movie was"], "train").token_ids[0]).endswith(
        "<|im_start|>user\nThe movie was<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match=r"data.chat_template = true, but the tokenizer .* has no chat template; "
                                         r"set data.chat_template=false"):
        encoder(twin_dirs["gpt2"], "data.chat_template=true").encode(["x"], "train")


def test_tiny_model_command_builds_the_twin_it_is_asked_for(tmp_path, capsys):
    from raylign.cluster.cli import main

    assert main(["tiny-model", str(tmp_path / "pythia"), "--like", "pythia"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "pythia")
    config = json.loads((tmp_path / "pythia" / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"]


def test_builtin_review_words_carry_their_moods_sign_in_vader():
    from raylign.actors.rewards import vader_sentiment
    from raylign.common.data import review_vocabulary

    vocabulary = review_vocabulary()

    def compound(texts):
        return vader_sentiment([], texts)

    assert min(compound([f"the movie was {w}" for w in vocabulary["positive"]])) > 0.1
    assert max(compound([f"the movie was {w}" for w in vocabulary["negative"]])) < -0.1
    # Everything but the mood's adjectives and verdicts is sentiment-free, so the reward reads the mood alone.
    neutral = ([f"the movie was {w}" for w in vocabulary["neutral"]] + [f"the movie was {w} long" for w in vocabulary["adverbs"]]
               + [f"{s} {v} long" for s in vocabulary["subjects"] for v in vocabulary["verbs"]]
               + [f"it had a long {n}" for n in vocabulary["nouns"]] + vocabulary["neutral_tails"])
    assert set(compound(neutral)) == {0.0}
    assert min(compound(vocabulary["positive_tails"])) >= 0.0 and max(compound(vocabulary["negative_tails"])) <= 0.0


def test_builtin_review_continuations_are_diverse_and_balanced():
    import random
    import statistics

    from raylign.actors.rewards import vader_sentiment
    from raylign.common.data import builtin_corpus_texts, review_continuation
    from raylign.common.eval_metrics import distinct_n

    # What the quickstart's test set pools (64 prompts x 4 continuations) bounds the distinct-2 a model trained
    # on the corpus can show; positive continuations alone are what a sentiment reward leaves.
    rng = random.Random(0)
    assert distinct_n([" ".join(review_continuation(rng, "positive").split()[:10]) for _ in range(256)], 2) > 0.45
    assert abs(statistics.fmean(vader_sentiment([], builtin_corpus_texts(num_texts=1000)))) < 0.1
