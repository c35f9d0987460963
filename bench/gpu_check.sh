#!/usr/bin/env bash
# The GPU check a session with the device machine (one H100/H200, PyTorch 2.11 + Lightning 2.6,
# no TensorFlow, no network) runs in ONE call. Prepare here first:
#
#   bash bench/gpu_check.sh --prepare      # copies the MNIST cache and the wheels the device lacks
#                                          # into .gpu-carry/ (git-ignored, ~60 MB)
#
# then run on the device, carrying .gpu-carry:
#
#   run(command="bash bench/gpu_check.sh", carry=[".gpu-carry"], timeout_s=480)
#
# It measures, on one GPU, MLP batch 64, 2 epochs of real MNIST: the textbook loop, the tuned loop,
# the tuned loop with torch.compile, torch_ddp and lightning_ddp at N=1 (NCCL), and 2 and 4 ranks
# sharing the GPU through gloo (NCCL refuses two ranks on one GPU). Tables go to $OUT/gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$CARRY/cache" "$CARRY/wheels"
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  python3 -m scaling data fetch mnist --cache-dir "$CARRY/cache"
  python3 -m pip download -q -d "$CARRY/wheels" hydra-core omegaconf antlr4-python3-runtime==4.9.3 rich \
    jsonschema jsonschema-specifications referencing rpds-py attrs markdown-it-py mdurl pygments psutil
  du -sh "$CARRY"
  exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export SCALING_CACHE=$PWD/$CARRY/cache SCALING_OFFLINE=1
python3 -m pip install -q --no-index --find-links "$CARRY/wheels" hydra-core rich jsonschema psutil 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

RES=$OUT/results
run() {  # name, overrides...
  local name=$1; shift
  timeout 300 python3 -m scaling run results_dir="$RES" run_name="$name" progress=false device=cuda \
    train.epochs=2 "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"
}
run textbook backend=torch_textbook
run tuned backend=torch
run compile backend=torch backend.fast=compile
run ddp1 backend=torch_ddp devices=1
run lightning1 backend=lightning_ddp devices=1
run ddp2_gloo backend=torch_ddp devices=2 backend.process_group=gloo
run ddp4_gloo backend=torch_ddp devices=4 backend.process_group=gloo
run lightning2_gloo backend=lightning_ddp devices=2 backend.process_group=gloo

python3 - "$RES" > "$OUT/gpu_check.md" <<'PY'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("runs/*.json")):
    r = json.loads(p.read_text()); m = r["metrics"] or {}
    rows.append((p.stem, r["status"], m.get("samples_per_s"), m.get("final_test_accuracy"),
                 (r["environment"].get("gpu") or {}).get("model"), (r["error"] or "").splitlines()[:1]))
print("| run | status | samples/s | accuracy | GPU | error |\n|---|---|---|---|---|---|")
for name, status, sps, acc, gpu, err in rows:
    print(f"| {name} | {status} | {sps and f'{sps:,.0f}'} | {acc} | {gpu} | {err[0] if err else ''} |")
PY
cat "$OUT/gpu_check.md"
