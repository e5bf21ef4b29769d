"""The weights dtypes a config can name (`model.dtype`) and the mixed precision that goes with them."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mixed_precision(dtype: str, device: torch.device):
    """Autocast to `dtype` on `device` for bfloat16/float16 weights; nothing for float32 ones.

    PEFT keeps LoRA adapters in float32 beside a low-precision base (and so does their optimizer state);
    under autocast their matmuls run in the base's dtype too, as a bf16 trainer's do. Without it every LoRA
    layer computes in float32: a 86M bf16 learner step took 2.10 s against 1.69 s under autocast on CPU.
    """
    if dtype == "float32":
        return contextlib.nullcontext()
    # Without its cast cache: autocast would otherwise keep one low-precision copy of each float32 parameter
    # for the whole region, so weights changed in place inside it (an optimizer step before the next epoch's
    # forward, an older adapter version set to check stale samples) would go unseen.
    return torch.autocast(device.type, dtype=DTYPES[dtype], cache_enabled=False)


def attention_kernel(setting: str, dtype: str, device: torch.device) -> str:
    """model.attn_implementation resolved: 'auto' is 'eager' on CPU with low-precision weights, else 'sdpa'."""
    if setting != "auto":
        return setting
    return "eager" if device.type == "cpu" and dtype != "float32" else "sdpa"
