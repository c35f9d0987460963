#!/usr/bin/env bash
# The GPU check: run on a GPU node (PyTorch with CUDA installed; TensorFlow not needed).
#
#   bash bench/gpu_check.sh                  # every torch backend and fast mode, ~5 min on one GPU
#   bash bench/gpu_check.sh --epochs 5       # further arguments go to bench/gpu_check.py
#
# A node without network access: on a machine with one, `bash bench/gpu_check.sh --prepare` puts
# real MNIST and the pure-Python wheels this project needs beside torch into gpu-check-bundle/
# (~60 MB); copy the clone with that folder to the node and run the check there: it installs from
# the bundle and reads MNIST from it, offline.
#
# Results: results/gpu_check/gpu_check.md (table, and PASS/FAIL for each target), one record and
# one log per run beside it ($OUT, where set, takes the place of results/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=gpu-check-bundle

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$BUNDLE/cache" "$BUNDLE/wheels"
  python3 -m scaling data fetch mnist --cache-dir "$BUNDLE/cache" || exit 1
  python3 -m pip download -q -d "$BUNDLE/wheels" hydra-core omegaconf antlr4-python3-runtime==4.9.3 rich \
    jsonschema jsonschema-specifications referencing rpds-py attrs markdown-it-py mdurl pygments psutil || exit 1
  du -sh "$BUNDLE"
  exit 0
fi

if [ -d "$BUNDLE" ]; then
  export SCALING_CACHE=$PWD/$BUNDLE/cache SCALING_OFFLINE=1
  python3 -m pip install -q --no-index --find-links "$BUNDLE/wheels" hydra-core rich jsonschema psutil 2>&1 | tail -2
fi
python3 -c "import scaling" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')" || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
exec python3 bench/gpu_check.py --out "${OUT:-results/gpu_check}" "$@"
