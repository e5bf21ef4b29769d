"""Reward models: the reward actor scores with them, the learner trains them.

Three kinds behind one interface (`RewardModel`): `reward(input_ids,
attention_mask) -> [B]` on token ids, `score_texts(texts)` on strings, and
`score_prompt_completions(prompts, completions)` on pairs tokenised exactly as
the learner's reward-model training tokenises them.

- `ScalarRewardModel` (kind "scalar"): a causal-LM body plus a linear head on
  the hidden state of the last non-pad token, one scalar per sequence; the
  Bradley-Terry reward model of the gpt2_hh_rlhf seed.
- `SequenceClassificationRewardModel` (kind "seqcls"): transformers'
  `AutoModelForSequenceClassification` with `num_labels=1`, optionally with a
  PEFT LoRA adapter on top (the smollm2_orca seed).
- `ClassifierRewardModel` (kind "classifier"): a frozen body, mean pooling over
  non-pad tokens, an MLP hidden -> hidden -> 2, reward = P(positive) (the
  grade_vs_policy_gradient seed). It shares the policy's vocabulary, so
  `reward_from_distributions` can score soft token distributions and pass
  gradients back to them (GRADE).

On disk a reward model is a directory: the body in transformers' format, the
tokenizer, `reward_model.json` naming the kind, and (scalar, classifier) the
head weights in `reward_head.safetensors`. `load_reward_model` reads any of them.
"""

from __future__ import annotations

import abc

import json
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from raylign.common.precision import DTYPES
from raylign.common.storage import local_copy

REWARD_MODEL_CONFIG = "reward_model.json"
REWARD_HEAD_WEIGHTS = "reward_head.safetensors"
KINDS = ("scalar", "seqcls", "classifier")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last non-pad token per row, for left or right padding (0 for an all-pad row)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states of non-pad tokens: [B, T, H] -> [B, H]."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype = '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _default_max_length(tokenizer, config) -> int:
    """The tokenizer's limit, capped by the model's positions (hub tokenizers often say 1e30)."""
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None) or 2048]
    return int(min(limits))


def _read_reward_config(directory: Path) -> dict | None:
    path = directory / REWARD_MODEL_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def _check_kind(directory: Path, expected: str) -> dict:
    meta = _read_reward_config(directory)
    if meta is None:
        raise ValueError(
            f"'{directory}' has no {REWARD_MODEL_CONFIG}, so it is not a saved reward model; "
            f"save one with {expected.title()}RewardModel.save_pretrained, or point at the directory that holds it"
        )
    if meta.get("kind") != expected:
        raise ValueError(
            f"'{directory}' holds a '{meta.get('kind')}' reward model, not '{expected}'; "
            f"load it as kind '{meta.get('kind')}'"
        )
    return meta


class RewardModel(nn.Module, metaclass=abc.ABCMeta):
    """One scalar per sequence. Subclasses implement `reward`; `score_texts` and `score_prompt_completions`
    tokenise and batch. `forward` is what training optimises: the reward itself (scalar, seqcls) or
    class logits (classifier)."""

    kind: ClassVar[str]

    def __init__(self, tokenizer, max_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @abc.abstractmethod
    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One reward per sequence [B] for right- or left-padded token ids."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.reward(input_ids, attention_mask)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded, truncated to `max_length`, on the model's device."""
        rows = self.tokenizer(list(texts), truncation=True, max_length=self.max_length).input_ids
        return self._collate(rows)

    def score_texts(self, texts: list[str], batch_size: int = 32) -> list[float]:
        """Score strings (tokenised with the tokenizer's special tokens, truncated to `max_length`), in order."""
        return self._score_rows(self.tokenizer(list(texts), truncation=True, max_length=self.max_length).input_ids, batch_size)

    def score_prompt_completions(
        self, prompts: list[str], completions: list[str], batch_size: int = 32, chat_template: bool | None = None
    ) -> list[float]:
        """Score prompt + completion tokenised as the learner's reward-model training tokenises them
        (`common.prompt_completion`: the prompt with BOS, the completion, EOS; or the chat template),
        so a model scores at RL time exactly what it was trained on."""
        from raylign.common.prompt_completion import encode_prompt_completion

        rows = []
        for prompt, completion in zip(prompts, completions, strict=True):
            prompt_ids, completion_ids = encode_prompt_completion(
                self.tokenizer, prompt, completion, chat_template=chat_template, max_length=self.max_length
            )
            rows.append(prompt_ids + completion_ids)
        return self._score_rows(rows, batch_size)

    @torch.no_grad()
    def _score_rows(self, rows: list[list[int]], batch_size: int) -> list[float]:
        """Token-id rows in right-padded batches of `batch_size`, in eval mode; one float per row, in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: give a positive number of sequences per forward pass")
        # Rows of similar length share a batch, so less compute goes to padding.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        scores: list[float] = [0.0] * len(rows)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                values = self.reward(**self._collate([rows[i] for i in chunk])).float().cpu().tolist()
                for index, value in zip(chunk, values):
                    scores[index] = value
        finally:
            self.train(was_training)
        return scores

    def _collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        from raylign.common.prompt_completion import collate_prompt_completion, pad_token_id

        batch = collate_prompt_completion([(list(ids), []) for ids in rows], pad_token_id(self.tokenizer))
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}

    def _save_common(self, directory: Path, meta: dict) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / REWARD_MODEL_CONFIG).write_text(json.dumps({"kind": self.kind, "max_length": self.max_length, **meta}, indent=2))


class _HeadRewardModel(RewardModel):
    """A transformers body (saved in its own format) plus a small head saved as safetensors."""

    def __init__(self, backbone, tokenizer, max_length: int | None):
        # `base_model` is the transformer body of a *ForCausalLM and the model itself for a bare body.
        backbone = backbone.base_model
        super().__init__(tokenizer, max_length or _default_max_length(tokenizer, backbone.config))
        self.backbone = backbone
        self.hidden_size = backbone.config.hidden_size

    def _head_meta(self) -> dict:
        return {}

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        self.backbone.save_pretrained(directory)
        self._save_common(directory, {"hidden_size": self.hidden_size, **self._head_meta()})
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.head.state_dict().items()}
        save_file(state, str(directory / REWARD_HEAD_WEIGHTS))
        return directory

    @classmethod
    def from_base(cls, model_path: str | Path, dtype: str | torch.dtype | None = None, max_length: int | None = None, **head_options):
        """A fresh head on a pretrained body (a causal LM directory or hub id), in train mode: the start for training."""
        from transformers import AutoModel, AutoTokenizer

        backbone = AutoModel.from_pretrained(str(model_path), dtype=resolve_dtype(dtype) or "auto")
        return cls(backbone, AutoTokenizer.from_pretrained(str(model_path)), max_length=max_length, **head_options).train()

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: str | torch.dtype | None = None, max_length: int | None = None):
        """Load what `save_pretrained` wrote, in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = _check_kind(directory, cls.kind)
        options = {key: meta[key] for key in cls._head_option_names() if key in meta}
        model = cls.from_base(directory, dtype=dtype, max_length=max_length or meta.get("max_length"), **options)
        model.head.load_state_dict(load_file(str(directory / REWARD_HEAD_WEIGHTS)))
        return model.eval()

    @classmethod
    def _head_option_names(cls) -> tuple[str, ...]:
        return ()


class ScalarRewardModel(_HeadRewardModel):
    """Bradley-Terry reward model: linear head on the last non-pad token's hidden state.

    Train with `-logsigmoid(reward(chosen) - reward(rejected))`. Padding after the
    last token does not change the score (causal attention never looks right).
    """

    kind = "scalar"

    def __init__(self, backbone, tokenizer, max_length: int | None = None):
        super().__init__(backbone, tokenizer, max_length)
        self.head = nn.Linear(self.hidden_size, 1)
        # Small initial rewards, as OpenRLHF and TRL start their value heads.
        nn.init.normal_(self.head.weight, std=1.0 / (self.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = last_token_index(attention_mask)
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(final.to(self.head.weight.dtype)).squeeze(-1)


class ClassifierRewardModel(_HeadRewardModel):
    """Frozen body, mean pooling over non-pad tokens, MLP hidden -> hidden -> 2; reward = P(positive).

    Only the head trains: the body's parameters have `requires_grad=False` and
    it stays in eval mode even when the model is put in train mode.
    """

    kind = "classifier"

    def __init__(self, backbone, tokenizer, max_length: int | None = None, dropout: float = 0.1):
        super().__init__(backbone, tokenizer, max_length)
        self.backbone.requires_grad_(False)
        self.dropout = dropout
        self.head = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size), nn.ReLU(), nn.Dropout(dropout), nn.Linear(self.hidden_size, 2)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits [B, 2], what cross-entropy training needs; `reward` gives P(positive)."""
        return self.logits(input_ids, attention_mask)

    def train(self, mode: bool = True) -> "ClassifierRewardModel":
        super().train(mode)
        self.backbone.eval()
        return self

    def _head_meta(self) -> dict:
        return {"dropout": self.dropout}

    @classmethod
    def _head_option_names(cls) -> tuple[str, ...]:
        return ("dropout",)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits [B, 2] (index 1 = positive); train the head with cross-entropy on these."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._classify(hidden, attention_mask)

    def logits_from_distributions(self, token_probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits for soft tokens: `token_probs` [B, T, V] times the input embedding matrix."""
        hidden = self.backbone(inputs_embeds=self.soft_embeddings(token_probs), attention_mask=attention_mask).last_hidden_state
        return self._classify(hidden, attention_mask)

    def soft_embeddings(self, token_probs: torch.Tensor) -> torch.Tensor:
        """Expected input embedding under each position's token distribution: [B, T, V] -> [B, T, H]."""
        embeddings = self.backbone.get_input_embeddings()
        weight = embeddings.weight
        if token_probs.shape[-1] != weight.shape[0]:
            raise ValueError(
                f"token_probs has {token_probs.shape[-1]} columns but the reward model's vocabulary has "
                f"{weight.shape[0]} embeddings; the classifier reward model must share the policy's vocabulary "
                "(build it with ClassifierRewardModel.from_base(policy_path))"
            )
        soft = token_probs.to(weight.dtype) @ weight
        # Some bodies (Gemma 3) scale inside the embedding module, which a plain matmul would skip.
        scale = getattr(embeddings, "embed_scale", None)
        return soft if scale is None else soft * scale

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits(input_ids, attention_mask).softmax(dim=-1)[:, 1]

    def reward_from_distributions(self, token_probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """P(positive) [B] for soft token distributions; differentiable w.r.t. `token_probs`.

        Equals `reward(ids, mask)` when `token_probs` are the exact one-hots of `ids`.
        """
        return self.logits_from_distributions(token_probs, attention_mask).softmax(dim=-1)[:, 1]

    def _classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = mean_pool(hidden, attention_mask)
        return self.head(pooled.to(self.head[0].weight.dtype))


class SequenceClassificationRewardModel(RewardModel):
    """transformers' sequence-classification model with one label, optionally with a LoRA adapter.

    transformers pools the logit at the last token whose id differs from `config.pad_token_id`. That is the
    wrong position whenever the pad id is also a real token (SmolLM2 pads with its EOS, which ends every
    scored sequence), so for decoder classifiers (a per-position `score` head) the head's output is read at
    the last position the attention mask marks instead; the config's pad id is only a filler.
    """

    kind = "seqcls"

    def __init__(self, model, tokenizer, max_length: int | None = None):
        from raylign.common.prompt_completion import pad_token_id

        super().__init__(tokenizer, max_length or _default_max_length(tokenizer, model.config))
        if model.config.num_labels != 1:
            raise ValueError(
                f"the sequence-classification model has num_labels = {model.config.num_labels}; a reward model needs 1"
            )
        if model.config.pad_token_id is None:
            # transformers refuses batches without one; the value is never used to find a position here.
            model.config.pad_token_id = pad_token_id(tokenizer)
        self.model = model

    def _score_head(self) -> nn.Module | None:
        """The per-position classification head of a decoder classifier (wrapped by PEFT, if trained with LoRA)."""
        heads = [(name, module) for name, module in self.model.named_modules() if name.rsplit(".", 1)[-1] == "score"]
        return min(heads, key=lambda item: len(item[0]))[1] if heads else None

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        head = self._score_head()
        if head is None:  # an encoder classifier pools its first token: padding cannot move it
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        outputs: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
        per_position = outputs[-1]  # [B, T, 1]
        rows = torch.arange(per_position.shape[0], device=per_position.device)
        return per_position[rows, last_token_index(attention_mask), 0]

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        adapter: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int | None = None,
        merge_adapter: bool = True,
    ) -> "SequenceClassificationRewardModel":
        """A local directory or hub id; `adapter` is a PEFT LoRA directory trained on top of it.

        The adapter is merged into the weights by default (faster scoring); pass
        `merge_adapter=False` to keep it separate for further training.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=resolve_dtype(dtype) or "auto")
        tokenizer = AutoTokenizer.from_pretrained(str(adapter if adapter and _has_tokenizer(adapter) else path))
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
            if merge_adapter:
                model = model.merge_and_unload()
        meta = _read_reward_config(Path(path))
        return cls(model, tokenizer, max_length=max_length or (meta or {}).get("max_length")).eval()

    def save_pretrained(self, directory: str | Path) -> Path:
        """The model in transformers' format; an unmerged LoRA adapter saves as the adapter alone (load it with `adapter=`)."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self._save_common(directory, {})
        return directory


def _has_tokenizer(directory: str | Path) -> bool:
    return (Path(directory) / "tokenizer_config.json").is_file()


REWARD_MODEL_CLASSES: dict[str, type[RewardModel]] = {
    "scalar": ScalarRewardModel,
    "seqcls": SequenceClassificationRewardModel,
    "classifier": ClassifierRewardModel,
}


def load_reward_model(
    path: str | Path,
    kind: str,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    max_length: int | None = None,
) -> RewardModel:
    """Load a reward model of `kind` ("scalar", "seqcls", "classifier") for scoring, in eval mode.

    "scalar" and "classifier" need a directory written by `save_pretrained`;
    "seqcls" also takes any sequence-classification checkpoint or hub id, plus a LoRA `adapter`.
    """
    if kind not in REWARD_MODEL_CLASSES:
        raise ValueError(f"reward model kind '{kind}' is unknown; use one of {', '.join(KINDS)}")
    if adapter is not None and kind != "seqcls":
        raise ValueError(f"adapter = '{adapter}': only 'seqcls' reward models load a LoRA adapter; merge it into the '{kind}' model's body instead")
    path, adapter = local_copy(path), None if adapter is None else local_copy(adapter)
    if kind == "seqcls":
        model = SequenceClassificationRewardModel.from_pretrained(path, adapter=adapter, dtype=dtype, max_length=max_length)
    else:
        model = REWARD_MODEL_CLASSES[kind].from_pretrained(path, dtype=dtype, max_length=max_length)
    model.requires_grad_(False)
    return model.eval()
