#!/usr/bin/env bash
# GPU check: train the gpt2-124m preset with bf16, flash SDPA and torch.compile for a few hundred
# steps on one GPU through `raylm pretrain`'s trainer (Ray Train, 1 worker); print tokens/s and MFU
# (goal >= 45% on an H200). Data: the built-in python-stdlib corpus (no network).
#
#   bash benchmarks/gpu_check.sh            # on a GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # CPU smoke test of this script (< 1 min, tiny model); the suite runs it
#
# Flags (see --help), each also an environment variable: --steps / GPU_CHECK_STEPS (300), --micro / GPU_CHECK_MICRO
# (16 sequences of 1024), --batch / GPU_CHECK_BATCH (32), --[no-]compile / GPU_CHECK_COMPILE (1), --smoke /
# GPU_CHECK_SMOKE=1. PYTHON: the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import torch, ray.train, mlflow, tokenizers, pydantic" 2>/dev/null; then
  echo "gpu_check: installing raylm and its dependencies with $PYTHON -m pip install -e ." >&2
  "$PYTHON" -m pip install -q -e . || { echo "gpu_check: pip install failed (offline? install torch, ray[train], mlflow, tokenizers first)" >&2; exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}"
export TOKENIZERS_PARALLELISM=false
exec "$PYTHON" benchmarks/gpu_check.py "$@"
