"""Build tiny random causal LMs and a matching BPE tokenizer, fully offline.

The models are small enough to train in seconds on 2 CPU cores and keep
head_dim >= 32, which vLLM's CPU attention needs.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("llama", "qwen2", "gpt2")
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Qwen2's tokenizer class adds this token when it is missing; shipping it keeps vocab sizes equal across archs.
ENDOFTEXT = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer.

    BOS is added by the post-processor so every engine tokenises prompts the same way.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left",
        model_max_length=256,
    )


def tiny_model_config(arch: str, vocab_size: int, tokenizer) -> object:
    """A ~0.5M-parameter config: hidden 128, 2 heads (head_dim 64), 2 layers."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, **ids,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, **ids,
        )
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=128, n_head=2, n_layer=2, n_positions=256, **ids)
    raise ValueError(f"arch = '{arch}' is not supported; choose one of {', '.join(ARCHITECTURES)}")


def build_tiny_model(output_dir: str | Path, arch: str = "llama", seed: int = 0, vocab_size: int = 512) -> Path:
    """Train a tokenizer on the built-in review corpus and save a random model + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylign.common.data import builtin_corpus_texts

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch = '{arch}' is not supported; choose one of {', '.join(ARCHITECTURES)}")
    output_dir = Path(output_dir)
    tokenizer = train_tokenizer(builtin_corpus_texts(seed=seed), vocab_size=vocab_size)
    config = tiny_model_config(arch, len(tokenizer), tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
