#!/usr/bin/env bash
# GPU check: is this GPU node fit for the scaling study, and how fast is each torch backend on it?
#
# What it checks (bench/gpu_check.py runs each as a short `scaling run` on the node's first GPU:
# MLP, per-device batch 64, 2 epochs of real MNIST):
#   - the torch step loops: textbook, tuned, torch.compile, whole-step CUDA graph (and the last
#     two with the host waiting only every 100 steps, the measurement protocol's own cost), against
#     the hand-written graphed loop bench/graphed_loop.py;
#   - torch_ddp (eager and graphed), lightning_ddp, and horovod_torch if Horovod is built with
#     NCCL, at N=1 over NCCL; torch_ddp and lightning_ddp with 2 and 4 ranks sharing the GPU over
#     gloo; the tuned loop on the CPU, whose accuracy the GPU runs must match.
#   Targets, each PASS or FAIL in the summary: graphed step >= 250k samples/s and >= 90% of the
#   hand-written graph; torch_ddp graphed at N=1 >= 200k; tuned >= 4x textbook; protocol
#   overhead <= 2%; every accuracy within 0.005 of the CPU's.
#
# Requirements: an NVIDIA GPU with its driver (nvidia-smi), Python 3.10+ as python3 with a CUDA
# build of PyTorch (>= 2.1) and this project's light dependencies (hydra-core, rich, jsonschema,
# psutil: `python3 -m pip install -e .` installs them) already installed; TensorFlow is not
# needed, Horovod is optional. Network access to fetch MNIST once, unless the bundle below is here.
#
# How to run, from anywhere in this checkout (about 5 minutes on one GPU):
#   bash bench/gpu_check.sh                          # every run
#   bash bench/gpu_check.sh --epochs 5               # options go to bench/gpu_check.py:
#   bash bench/gpu_check.sh --only tuned,graph       #   --epochs, --sync-every, --only, --out
#   OUT=/scratch/me/gpu_check bash bench/gpu_check.sh
# A node without network: on a machine with network run `bash bench/gpu_check.sh --prepare`,
# which writes gpu-check-bundle/ (real MNIST and the wheels, ~60 MB) into this checkout; copy the
# checkout with that folder to the node and run the check there: it installs from the bundle and
# reads MNIST from it, offline.
#
# What it writes, and where:
#   - $OUT, by default results/gpu_check/ in this checkout: gpu_check.md (the table and the
#     PASS/FAIL lines, also printed), <run>.log per run, results/runs/<run>.json (the records),
#     graphed_loop.json (the reference loop's figures);
#   - MNIST cache: gpu-check-bundle/cache/ when the bundle is here, else $SCALING_CACHE or
#     ~/.cache/scaling (fetched once);
#   - the Python environment of python3: from the bundle, hydra-core, rich, jsonschema, psutil;
#     and this checkout as an editable package when `import scaling` fails (pip, --no-deps).
#   Besides these, only the libraries' own caches (torch.compile's /tmp/torchinductor_$USER);
#   nothing under .git.
# Exit status: 0 when every run finished (see gpu_check.md for the targets), 1 if one failed,
# 2 when torch sees no CUDA device.
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
