"""LoRA adapter (de)serialisation in PEFT's own file format, and merged weights.

The adapter's bytes are exactly what `PeftModel.save_pretrained` writes, so
vLLM's `LoRARequest` and PEFT's loaders both read them unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LiveAdapter:
    """A PEFT model's default adapter as PEFT names it in its files (get_peft_model_state_dict's keys), each
    name bound to the live parameter. Reading or replacing the adapter through it walks no module tree:
    PEFT's get_/set_peft_model_state_dict take 2.1 and 1.5 ms even on the tiny Llama, most of a publish.
    Bind it after the adapter exists; parameters updated in place (optimizer steps) stay bound."""

    def __init__(self, peft_model):
        from peft import get_peft_model_state_dict

        live = {tensor.data_ptr(): tensor for tensor in [*peft_model.parameters(), *peft_model.buffers()]}
        self.tensors = {}
        for name, tensor in get_peft_model_state_dict(peft_model).items():
            if tensor.data_ptr() not in live:
                raise RuntimeError(f"adapter tensor {name} is not one of the model's parameters or buffers")
            self.tensors[name] = live[tensor.data_ptr()]

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Copy an adapter state (the same names) into the live parameters."""
        if state.keys() != self.tensors.keys():
            unexpected, missing = sorted(state.keys() - self.tensors.keys()), sorted(self.tensors.keys() - state.keys())
            raise RuntimeError(f"adapter version {version} does not fit this model's adapter: it has tensors the "
                               f"model lacks {unexpected[:3]} and lacks tensors the model has {missing[:3]}")
        for name, tensor in state.items():
            self.tensors[name].copy_(tensor)


def adapter_files(peft_model, version: int, adapter: LiveAdapter | None = None) -> dict[str, bytes]:
    """The default adapter's files; `adapter` (bound to `peft_model`) reads its tensors without PEFT's walk."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    tensors = adapter.tensors if adapter is not None else get_peft_model_state_dict(peft_model)
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in tensors.items()}
    config = peft_model.peft_config["default"].to_dict()
    if isinstance(config.get("target_modules"), set):
        config["target_modules"] = sorted(config["target_modules"])
    config["raylign_version"] = version
    return {ADAPTER_WEIGHTS: save(state), ADAPTER_CONFIG: json.dumps(config, default=str).encode()}


def write_adapter(files: dict[str, bytes], directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        (directory / name).write_bytes(payload)
    return directory


def adapter_state_dict(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(files[ADAPTER_WEIGHTS])


def adapter_lora_config(files: dict[str, bytes]):
    from peft import LoraConfig

    config = json.loads(files[ADAPTER_CONFIG])
    config.pop("raylign_version", None)
    return LoraConfig.from_peft_type(**config) if hasattr(LoraConfig, "from_peft_type") else LoraConfig(**config)


def merged_lora_weights(peft_model) -> dict[str, torch.Tensor]:
    """Every linear layer an engine must reload, under base-model names, in the base's dtype: each LoRA-adapted
    one as W + delta (a new tensor), and the unadapted linear layers beside it (same parent module) as they are
    (the model's own tensors: an engine copies them), biases included. See `layers_to_reload`."""
    return merge_layers(layers_to_reload(peft_model))


def layers_to_reload(peft_model) -> list[tuple[str, torch.nn.Module]]:
    """(base-model name, module) of every linear layer merged weights must name: each LoRA-adapted one, and the
    unadapted linear layers beside it (same parent module). They depend only on the adapter's layout, so a
    holder of one PEFT model (`AdapterMerger`) finds them once, not at every publish.

    vLLM fuses sibling layers (q/k/v into one qkv_proj, gate/up into gate_up_proj), and its in-place reload
    rebuilds a fused layer only from all of its parts: an adapter on q_proj and v_proj alone must still send
    k_proj, or the reloaded qkv_proj holds uninitialised memory where k was.

    An adapter that W + B A does not describe is refused (ValueError): see `refuse_unmergeable`.
    """
    from transformers.pytorch_utils import Conv1D

    refuse_unmergeable(peft_model)
    linear = (torch.nn.Linear, Conv1D)  # GPT-2's Conv1D: the same map with a transposed weight
    prefix = "base_model.model."
    modules = dict(peft_model.named_modules())
    adapted_parents = {name.rpartition(".")[0] for name, module in modules.items() if _adapted(module)}
    return [(f"{parent}.{child_name}".removeprefix(prefix), child)
            for parent in sorted(adapted_parents) for child_name, child in modules[parent].named_children()
            if _adapted(child) or isinstance(child, linear)]


@torch.no_grad()
def merge_layers(layers: list[tuple[str, torch.nn.Module]]) -> dict[str, torch.Tensor]:
    """The weights (and biases) of `layers_to_reload`'s layers, each adapted one as W + delta."""
    merged = {}
    for name, layer in layers:
        if _adapted(layer):
            base = layer.get_base_layer()
            # In the base's dtype: the float32 sum rounded once, as the engine would (and half the memory of a
            # float32 copy of a bf16 model's layers).
            merged[f"{name}.weight"] = (base.weight + layer.get_delta_weight("default")).to(base.weight.dtype)
        else:
            base = layer
            merged[f"{name}.weight"] = layer.weight.detach()
        if getattr(base, "bias", None) is not None:
            merged[f"{name}.bias"] = base.bias.detach()
    return merged


def _adapted(module) -> bool:
    """Whether `module` is a LoRA layer holding the policy adapter ('default')."""
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and "default" in module.lora_A


class AdapterMerger:
    """Merged weights made where they are used: a rollout actor with `rollout.weight_sync: merged` keeps its own
    copy of the base model (on CPU, in the run's dtype) and merges every published adapter into it, with the
    actor's own threads (`rollout.threads`), between its generate calls.

    So a publish sends the adapter, a few MB, whatever the model's size and however many rollout actors there
    are, and each actor merges in parallel with the others. (Merged on the learner, the 86M benchmark model's
    weights were 340 MB through Ray's object store every step: 0.25-0.45 s to put, on top of the merge.)
    Host memory per rollout actor: the base copy, plus, while a version loads, the merged layers (up to the
    model's linear weights once more). An adapter of another layout (another rank or other target modules,
    as in an evaluation of several models) gets a fresh base copy.
    """

    # Adapter-config fields that do not change the merged weights: two adapters that differ only in these
    # share a base copy (adapters saved from another path or by another PEFT version).
    NOT_LAYOUT = ("raylign_version", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                  "auto_mapping", "lora_dropout", "init_lora_weights")

    def __init__(self, model_path: str, dtype: torch.dtype):
        self.model_path, self.dtype = model_path, dtype
        self.model = self.adapter = self.layout = self.layers = None

    def merged_weights(self, update) -> dict[str, torch.Tensor]:
        """`merged_lora_weights` of the base model with `update`'s adapter (an AdapterUpdate) in it."""
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        config = json.loads(update.files[ADAPTER_CONFIG])
        layout = {key: value for key, value in config.items() if key not in self.NOT_LAYOUT}
        if layout != self.layout:
            self.model = self.adapter = self.layers = None  # the old copy goes before the new one loads
            base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype)
            lora = adapter_lora_config(update.files)
            lora.init_lora_weights = True  # every LoRA tensor is loaded below; an init such as PiSSA would change W
            self.model = get_peft_model(base, lora).eval()
            self.adapter, self.layout, self.layers = LiveAdapter(self.model), layout, layers_to_reload(self.model)
        self.adapter.load(adapter_state_dict(update.files), update.version)
        return merge_layers(self.layers)


def refuse_unmergeable(peft_model) -> None:
    """Merged weights carry W + scale * B A for linear layers and nothing else: refuse (ValueError), naming the layer, an
    adapter whose effect is more (DoRA's magnitudes, LoRA biases, trained copies of whole modules), lives
    elsewhere (embeddings), or would reach the input embeddings through a tied head."""
    from peft.tuners.lora import LoraLayer

    fix = "use rollout.weight_sync=lora (vLLM with LoRA, where it has LoRA for the model) or rollout.backend=hf"
    embedding = peft_model.get_input_embeddings().weight
    for name, module in peft_model.named_modules():
        if type(module).__name__ == "ModulesToSaveWrapper":
            raise ValueError(f"merged weights: {name} is trained whole (LoRA modules_to_save), which merged weights "
                             f"do not carry; {fix}")
        if not isinstance(module, LoraLayer):
            continue
        what = ("a LoRA on an embedding" if "default" in getattr(module, "lora_embedding_A", {}) else
                "DoRA" if getattr(module, "use_dora", {}).get("default") else
                "a LoRA bias (lora_bias)" if getattr(module, "lora_bias", {}).get("default") else
                "a LoRA on the output head tied to the input embeddings"
                if "default" in module.lora_A and module.get_base_layer().weight is embedding else None)
        if what:
            raise ValueError(f"merged weights: {name} has {what}, which merged weights do not carry; {fix}")
