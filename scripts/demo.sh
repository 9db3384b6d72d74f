#!/usr/bin/env bash
# Set up .venv if needed, then run the main job (options go to `peft-federated demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/peft-federated demo "$@"
