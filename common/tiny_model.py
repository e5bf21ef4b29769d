"""Tiny random twins of real model families, with a BPE tokenizer trained offline on the built-in reviews.

Each twin has its family's real architecture class and module names (GPT-2's Conv1D `c_attn`/`c_proj`,
GPT-NeoX's `query_key_value`, `q_proj`/`v_proj` elsewhere), ties its embeddings where the real model does,
and reproduces the real tokenizer's quirks: which special tokens exist, whether a BOS is added, whether
there is a pad token, and the chat template. Code that works on a twin therefore meets the same cases it
meets on the real model, in a second of CPU time. Every twin keeps head_dim >= 32 (vLLM's CPU attention).

`llama` is the original built-in model: the convenient tokenizer (a pad token, BOS added, no chat template).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:tiny-"

_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def _chatml_template(default_system: str | None) -> str:
    system = (
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        f"{{{{ '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}{{% endif %}}"
        if default_system else ""
    )
    return (
        "{% for message in messages %}" + system
        + "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


@dataclass(frozen=True)
class Family:
    """What a twin copies from its real model: architecture, tying, positions and the tokenizer's quirks."""

    name: str
    real_model: str  # the hub model whose configuration and tokenizer the twin mimics
    architecture: str  # the transformers class saved in config.json
    special_tokens: tuple[str, ...]  # in vocabulary order, ids 0..n-1
    bos: str | None
    eos: str
    pad: str | None
    add_bos: bool  # the tokenizer's post-processor prepends BOS
    tie_embeddings: bool
    max_positions: int
    chat_template: str | None = None
    unk: str | None = None


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "Llama with raylign's original built-in tokenizer (pad token, BOS)", "LlamaForCausalLM",
           ("<pad>", "<s>", "</s>", "<|endoftext|>"), bos="<s>", eos="</s>", pad="<pad>", add_bos=True,
           tie_embeddings=False, max_positions=256),
    Family("gpt2", "openai-community/gpt2", "GPT2LMHeadModel", ("<|endoftext|>",),
           bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>", add_bos=False,
           tie_embeddings=True, max_positions=1024),
    Family("pythia", "EleutherAI/pythia-160m", "GPTNeoXForCausalLM", ("<|endoftext|>", "<|padding|>"),
           bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>", add_bos=False,
           tie_embeddings=False, max_positions=2048),
    Family("gemma", "google/gemma-2b-it", "GemmaForCausalLM",
           ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
           bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True, tie_embeddings=True,
           max_positions=8192, chat_template=_GEMMA_TEMPLATE),
    Family("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "LlamaForCausalLM",
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           # The instruct tokenizer pads with its EOS: a pad id that also ends every completion.
           bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", unk="<|endoftext|>", add_bos=False,
           tie_embeddings=True, max_positions=8192,
           chat_template=_chatml_template("You are a helpful AI assistant named SmolLM, trained by Hugging Face")),
    Family("qwen2", "Qwen/Qwen2-0.5B-Instruct", "Qwen2ForCausalLM", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False, tie_embeddings=True,
           max_positions=32768, chat_template=_chatml_template("You are a helpful assistant.")),
    Family("qwen3", "Qwen/Qwen3-8B", "Qwen3ForCausalLM", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False, tie_embeddings=False,
           max_positions=40960, chat_template=_chatml_template(None)),
)}


def family_of(path: str) -> str | None:
    """The family name of a 'builtin:tiny-<family>' model path, None for any other path."""
    return path[len(BUILTIN_PREFIX):] if path.startswith(BUILTIN_PREFIX) else None


def check_family(name: str, field: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(
            f"{field} = '{name}' is not a tiny-model family; choose one of {', '.join(FAMILIES)} "
            f"(as a model path: {', '.join(BUILTIN_PREFIX + n for n in FAMILIES)})"
        )
    return FAMILIES[name]


def train_tokenizer(texts: list[str], family: Family, vocab_size: int = 512):
    """Byte-level BPE trained on `texts` with the family's special tokens, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if family.add_bos:
        bos_id = tokenizer.token_to_id(family.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)]
        )
    named = {family.bos, family.eos, family.pad, family.unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
        unk_token=family.unk, extra_special_tokens=[t for t in family.special_tokens if t not in named],
        padding_side="left" if family.name == "llama" else "right", model_max_length=family.max_positions,
        chat_template=family.chat_template,
    )


def tiny_model_config(family: Family, tokenizer):
    """A config of ~0.5M parameters: hidden 128, 2 layers, 2 query heads of 64 (the family's KV sharing kept)."""
    from transformers import GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config, Qwen3Config

    vocab_size = len(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": family.tie_embeddings}
    common = {"vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": family.max_positions, **ids}
    if family.architecture == "GPT2LMHeadModel":
        return GPT2Config(vocab_size=vocab_size, n_embd=128, n_head=2, n_layer=2, n_positions=family.max_positions, **ids)
    if family.architecture == "GPTNeoXForCausalLM":
        return GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True)
    if family.architecture == "GemmaForCausalLM":
        # Gemma 2B uses multi-query attention (one KV head) and an explicit head_dim.
        return GemmaConfig(**common, num_key_value_heads=1, head_dim=64, hidden_activation="gelu_pytorch_tanh")
    if family.architecture == "Qwen2ForCausalLM":
        return Qwen2Config(**common, num_key_value_heads=1)
    if family.architecture == "Qwen3ForCausalLM":
        return Qwen3Config(**common, num_key_value_heads=1, head_dim=64)
    kv_heads = 1 if family.name == "smollm2" else 2  # SmolLM2 uses grouped-query attention
    return LlamaConfig(**common, num_key_value_heads=kv_heads)


def build_tiny_model(output_dir: str | Path, family: str = "llama", seed: int = 0, vocab_size: int = 512) -> Path:
    """Train the family's tokenizer on the built-in review corpus and save it with a random model of its architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylign.common.data import builtin_corpus_texts

    spec = check_family(family, "family")
    output_dir = Path(output_dir)
    tokenizer = train_tokenizer(builtin_corpus_texts(seed=seed), spec, vocab_size=vocab_size)
    config = tiny_model_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if type(model).__name__ != spec.architecture:
        raise RuntimeError(f"the {family} twin built a {type(model).__name__}, not {spec.architecture}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def resolve_builtin_model(path: str, directory: str | Path, seed: int) -> str:
    """'builtin:tiny-<family>' is built into `directory`; any other model path is returned as it is."""
    family = family_of(path)
    if family is None:
        return path
    return str(build_tiny_model(directory, family=family, seed=seed))
