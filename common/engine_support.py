"""Which rollout engine and weight sync a model gets, decided once at start-up from the installed vLLM.

vLLM does not serve every architecture, nor LoRA for every one it serves (0.32 has no LoRA for
`GPT2LMHeadModel`). Asking its model registry up front turns what would be a traceback from inside vLLM,
mid-start-up, into a choice that is logged once and recorded in results.json, or into one config error:

- the architecture is served with LoRA: vLLM with LoRA adapters (`weight_sync` as configured, default lora);
- served without LoRA: vLLM without LoRA, loading merged weights each step (vLLM's in-place reload, which
  repacks them on vLLM-CPU);
- not served: the transformers engine.

An explicit `rollout.weight_sync` that cannot work on `rollout.backend: vllm` is refused, naming the
architecture and the alternatives; leaving it unset lets the rules above choose.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


def query_vllm_registry(architecture: str) -> dict:
    """Ask vLLM's model registry, in this process, about `architecture` (its model class and SupportsLoRA)."""
    import vllm
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.platforms import current_platform

    registered = architecture in ModelRegistry.get_supported_archs()
    # The public resolver needs a full vLLM ModelConfig (it reads the checkpoint); the class lookup is all we need.
    model_class = ModelRegistry._try_load_model_cls(architecture) if registered else None
    return {"version": vllm.__version__, "cpu": current_platform.is_cpu(), "registered": model_class is not None,
            "lora": bool(model_class is not None and supports_lora(model_class))}


# The driver asks in a fresh interpreter: importing vLLM sets environment variables and logging it should not inherit.
_PROBE = (
    "import json, sys; from raylign.common.engine_support import query_vllm_registry; "
    "print(json.dumps({a: query_vllm_registry(a) for a in sys.argv[1:]}))"
)


@dataclass(frozen=True)
class VllmSupport:
    """What the installed vLLM offers for one architecture."""

    version: str
    cpu: bool  # the CPU build (vllm-cpu)
    architecture: str
    registered: bool  # vLLM has a model class for it (its own, or its Transformers backend)
    lora: bool  # that class implements SupportsLoRA

    @property
    def build(self) -> str:
        return f"vLLM {self.version} ({'CPU' if self.cpu else 'GPU'} build)"


_SUPPORT: dict[str, VllmSupport] = {}


def vllm_support(architecture: str) -> VllmSupport | None:
    """Ask the installed vLLM's model registry about `architecture` (once per process); None when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    if architecture not in _SUPPORT:
        ask_vllm(architecture)
    return _SUPPORT[architecture]


def ask_vllm(*architectures: str) -> None:
    """Ask about several architectures in one interpreter (each probe pays vLLM's import, about 12 s on 2 CPU
    cores); the answers are kept on disk for this installation of vLLM (`registry_cache_path`), so a later
    process asks again only about architectures it has not seen, or after vLLM is reinstalled."""
    installation = installed_vllm()
    cached = read_registry_cache(installation)
    missing = [architecture for architecture in architectures if architecture not in cached]
    if missing:
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
        result = subprocess.run([sys.executable, "-c", _PROBE, *missing], capture_output=True, text=True, env=env,
                                timeout=600)
        answer = next((line for line in reversed(result.stdout.splitlines()) if line.startswith("{")), None)
        if result.returncode != 0 or answer is None:
            raise RuntimeError(f"could not ask the installed vLLM about {', '.join(missing)}: {result.stderr.strip()[-2000:]}")
        cached.update(json.loads(answer))
        write_registry_cache(installation, cached)
    for architecture in architectures:
        _SUPPORT[architecture] = VllmSupport(architecture=architecture, **cached[architecture])


def registry_cache_path() -> Path:
    """$XDG_CACHE_HOME/raylign/vllm_registry.json (~/.cache when unset)."""
    from raylign.common.storage import raylign_cache_root

    return raylign_cache_root() / "vllm_registry.json"


# Bump when query_vllm_registry's answer changes shape or meaning: older cached answers are then asked again.
PROBE_FORMAT = 1


def installed_vllm() -> str:
    """What the answers depend on: where vLLM's package is and when it was written (a reinstall, even of the
    same version or of the other build, changes it), the transformers and torch it resolves model classes
    with, and the probe's own format."""
    import importlib.metadata as metadata

    origin = importlib.util.find_spec("vllm").origin
    libraries = ",".join(f"{name}={metadata.version(name)}" for name in ("transformers", "torch"))
    return f"{origin}@{os.stat(origin).st_mtime_ns};{libraries};probe={PROBE_FORMAT}"


def read_registry_cache(installation: str) -> dict:
    """The cached answers for this installation: architecture -> what `query_vllm_registry` returned."""
    try:
        cache = json.loads(registry_cache_path().read_text())
    except (OSError, ValueError):  # no cache yet, or an unreadable one: ask vLLM again
        return {}
    if not isinstance(cache, dict) or cache.get("installation") != installation or not isinstance(cache.get("answers"), dict):
        return {}  # another installation's answers, or not a cache this module wrote
    return dict(cache["answers"])


def write_registry_cache(installation: str, answers: dict) -> None:
    """Keep the answers for the next process (atomically). A cache that cannot be written only costs the next
    process another probe, so the run goes on."""
    path = registry_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"installation": installation, "answers": answers}, indent=1))
        os.replace(partial, path)
    except OSError as error:
        print(f"[raylign] could not write the vLLM registry cache {path}: {error}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class EnginePlan:
    """The engine and weight sync the rollout actors use, and why; recorded in results.json as `rollout_engine`."""

    backend: str  # "vllm" | "hf"
    weight_sync: str  # "lora" | "merged"
    architecture: str | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def plan_engine(backend: str, weight_sync: str | None, architecture: str | None,
                support: VllmSupport | None) -> EnginePlan:
    """The rules of the module docstring, as a pure function; ValueError for an explicit choice that cannot work."""
    if backend == "hf":
        return EnginePlan("hf", weight_sync or "lora", architecture, "rollout.backend = hf")
    if architecture is None:
        return EnginePlan("vllm", weight_sync or "lora", None, "the model declares no architecture: vLLM as configured")
    if support is None:
        raise ValueError(
            "rollout.backend = 'vllm', but vLLM is not installed; install it (pip install -e '.[cpu]' on a CPU "
            "machine, '.[gpu]' with CUDA) or set rollout.backend=hf (the transformers engine)"
        )
    build = support.build
    asked = f"rollout.backend = 'vllm' with rollout.weight_sync = '{weight_sync}'"
    if not support.registered:
        if weight_sync is not None:
            raise ValueError(
                f"{asked}: {build} has no model for {architecture}; set rollout.backend=hf (the transformers "
                "engine), or remove rollout.weight_sync to let raylign fall back to it"
            )
        return EnginePlan("hf", "lora", architecture, f"{build} has no model for {architecture}: the transformers engine samples")
    if support.lora:
        return EnginePlan("vllm", weight_sync or "lora", architecture, f"{build} supports LoRA for {architecture}")
    if weight_sync == "lora":
        raise ValueError(
            f"{asked}: {build} has no LoRA support for {architecture}; set rollout.weight_sync=merged (vLLM without "
            "LoRA, merged weights each step), rollout.backend=hf (the transformers engine loads the adapter), or "
            "remove rollout.weight_sync to let raylign choose merged"
        )
    return EnginePlan("vllm", "merged", architecture,
                      f"{build} has no LoRA for {architecture}: vLLM runs without LoRA and loads merged weights each step")


def engine_plan(backend: str, weight_sync: str | None, architecture: str | None) -> EnginePlan:
    """`plan_engine`, asking the installed vLLM when the backend is vLLM and the architecture is known."""
    support = vllm_support(architecture) if backend == "vllm" and architecture is not None else None
    return plan_engine(backend, weight_sync, architecture, support)
