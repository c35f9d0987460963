#!/usr/bin/env bash
# Builds Horovod 0.28.1 (the last release) from its PyPI sdist against the torch and TensorFlow
# that are installed (PyTorch + TensorFlow, gloo controller, no MPI, no MXNet), caches the wheel,
# installs it and checks it with a real 2-process allreduce.
#
# GPUs: with a CUDA build of torch installed, the wheel is built with HOROVOD_GPU_OPERATIONS=NCCL
# (all-reduce of GPU tensors through NCCL; the CUDA toolkit's nvcc and NCCL's headers must be
# found: set CUDA_HOME, and HOROVOD_NCCL_HOME where NCCL is not under it). Set
# HOROVOD_GPU_OPERATIONS=none to build the CPU-only wheel anyway. Without TensorFlow (a torch-only
# GPU node) the wheel is built for PyTorch alone.
#
# Idempotent: the wheel is cached under
#   ${SCALING_WHEEL_CACHE:-$HOME/.cache/scaling/wheels}/horovod-0.28.1-torch<ver>-tf<ver>-<pytag>/
# so a second run only installs (or finds it installed) and verifies instead of compiling
# (~4 min at -j2 on this project's CPU box, up to ~20 on slower cores). Full checks take ~1 min;
# once passed for a wheel, a rerun with nothing to install takes ~15 s.
# Run after .ci/install (torch and tensorflow must import).
#
# Environment: PYTHON (default python3), SCALING_WHEEL_CACHE (cache root),
#              HOROVOD_BUILD_JOBS (parallel compile jobs, default: number of cores),
#              HOROVOD_VERIFY=full (rerun the full checks even when they passed before).
set -euo pipefail

HVD_VERSION=0.28.1
PY=${PYTHON:-python3}
CACHE_ROOT=${SCALING_WHEEL_CACHE:-$HOME/.cache/scaling/wheels}

log() { printf '[horovod] %s\n' "$*" >&2; }
die() { printf '[horovod] ERROR: %s\n' "$*" >&2; exit 1; }

# Quiet TensorFlow's C++ start-up chatter in everything this script runs.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export OMP_NUM_THREADS=1
export PIP_ROOT_USER_ACTION=ignore  # no "running pip as root" warning on CI machines

# --- what we build against --------------------------------------------------------------------
PY_EXE=$("$PY" -c 'import sys; print(sys.executable)') || die "no Python at '$PY'"
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
SCRIPTS_DIR=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
TORCH_VER=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) \
  || die "torch does not import with $PY_EXE: run .ci/install first"
TF_VER=$("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null | tail -n1) || TF_VER=""
if [ -n "$TF_VER" ]; then
  TF_BUILD="HOROVOD_WITH_TENSORFLOW=1"; FRAMEWORKS="torch tensorflow"
else
  log "tensorflow does not import with $PY_EXE: building for PyTorch only"
  TF_VER=none; TF_BUILD="HOROVOD_WITHOUT_TENSORFLOW=1"; FRAMEWORKS="torch"
fi
TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)
GPU_OPS=${HOROVOD_GPU_OPERATIONS:-}
if [ -z "$GPU_OPS" ] && [ -n "$TORCH_CUDA" ]; then GPU_OPS=NCCL; fi
[ "$GPU_OPS" = none ] && GPU_OPS=""
if [ -n "$GPU_OPS" ]; then
  command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] \
    || die "torch $TORCH_VER is a CUDA $TORCH_CUDA build, so Horovod is built with HOROVOD_GPU_OPERATIONS=$GPU_OPS, which needs the CUDA toolkit (nvcc): load it (e.g. module load cuda) or set CUDA_HOME; HOROVOD_GPU_OPERATIONS=none builds a CPU-only wheel"
  log "GPU build: HOROVOD_GPU_OPERATIONS=$GPU_OPS (torch CUDA $TORCH_CUDA)"
fi

# PATCHES: bump when the patches below change, so a cached wheel built without them is not reused
PATCHES=p4
KEY="horovod-${HVD_VERSION}-${PATCHES}-torch${TORCH_VER}-tf${TF_VER}-${PY_TAG}${GPU_OPS:+-$(echo "$GPU_OPS" | tr 'A-Z' 'a-z')}"
WHEEL_DIR="$CACHE_ROOT/$KEY"
BUILD_LOG="$CACHE_ROOT/$KEY.build.log"
mkdir -p "$CACHE_ROOT"
log "python $PY_EXE, torch $TORCH_VER, tensorflow $TF_VER"

# Two CI jobs on one machine must not build into the same cache at once.
if command -v flock >/dev/null; then
  exec 9>"$CACHE_ROOT/.$KEY.lock"
  flock 9
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

find_wheel() { ls "$WHEEL_DIR"/horovod-"$HVD_VERSION"-*.whl 2>/dev/null | head -n1; }

# --- build (only when no cached wheel) ---------------------------------------------------------
WHEEL=$(find_wheel || true)
if [ -n "$WHEEL" ]; then
  log "cached wheel: $WHEEL"
else
  command -v cmake >/dev/null || die "cmake not found (apt-get install cmake)"
  command -v g++ >/dev/null || die "g++ not found (apt-get install g++)"

  log "downloading the horovod==$HVD_VERSION sdist"
  mkdir -p "$CACHE_ROOT/sdist"
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$CACHE_ROOT/sdist" \
    || die "pip download of horovod==$HVD_VERSION failed"
  SDIST="$CACHE_ROOT/sdist/horovod-$HVD_VERSION.tar.gz"
  [ -f "$SDIST" ] || die "expected $SDIST after pip download"
  tar -xzf "$SDIST" -C "$WORK"
  SRC="$WORK/horovod-$HVD_VERSION"

  log "patching the sdist for torch >= 2.1 (C++17), CPU-only TensorFlow >= 2.16 and multi-node Gloo"
  "$PY" - "$SRC" <<'PATCH' || die "patching the sdist failed (it is not the expected horovod $HVD_VERSION)"
import pathlib
import sys

src = pathlib.Path(sys.argv[1])


def edit(rel, old, new, why):
    path = src / rel
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"[horovod] patch '{why}': expected text not found exactly once in {rel}")
    path.write_text(text.replace(old, new))
    print(f"[horovod]   patched {rel}: {why}", file=sys.stderr)


# 1. torch >= 2.1 headers need C++17 ("C++17 or later compatible compiler is required"), but
#    horovod/torch/CMakeLists.txt sets C++14 and the top-level CMakeLists strips every -std=
#    flag, so CXXFLAGS cannot help. This is upstream PR #3998 (merged after 0.28.1): build the
#    torch extension as C++17 and link it to the C++17 copy of gloo (compatible17_gloo), which
#    the top-level CMakeLists then also builds for torch, not only for TF >= 2.10.
edit("horovod/torch/CMakeLists.txt",
     '# Append version number into metadata\n'
     'file(APPEND "${CMAKE_LIBRARY_OUTPUT_DIRECTORY_ROOT}/metadata.json" "\\"pytorch\\"',
     'if(Pytorch_VERSION VERSION_GREATER_EQUAL "2.1")\n'
     '    set(CMAKE_CXX_STANDARD 17)\n'
     '    set(Pytorch_CXX17 TRUE)\n'
     'elseif(Pytorch_VERSION VERSION_GREATER_EQUAL "1.5")\n'
     '    set(CMAKE_CXX_STANDARD 14)\n'
     '    set(Pytorch_CXX17 FALSE)\n'
     'else()\n'
     '    set(Pytorch_CXX17 FALSE)\n'
     'endif()\n\n'
     '# Append version number into metadata\n'
     'file(APPEND "${CMAKE_LIBRARY_OUTPUT_DIRECTORY_ROOT}/metadata.json" "\\"pytorch\\"',
     "C++17 for torch >= 2.1 (PR #3998)")
edit("horovod/torch/CMakeLists.txt",
     "if(HAVE_GLOO)\n    if (Pytorch_CXX11)\n        list(APPEND PYTORCH_LINKER_LIBS gloo)",
     "if(HAVE_GLOO)\n    if (Pytorch_CXX17)\n        list(APPEND PYTORCH_LINKER_LIBS compatible17_gloo)\n"
     "    elseif (Pytorch_CXX11)\n        list(APPEND PYTORCH_LINKER_LIBS gloo)",
     "link the C++17 gloo (PR #3998)")
edit("horovod/torch/CMakeLists.txt",
     'if(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n    set(CMAKE_CXX_STANDARD 14)\nendif()\n',
     "set(Pytorch_CXX17 ${Pytorch_CXX17} PARENT_SCOPE)\n",
     "drop the late C++14 override, export Pytorch_CXX17 (PR #3998)")
edit("CMakeLists.txt",
     "if(HAVE_GLOO AND (DEFINED Tensorflow_CXX17 AND Tensorflow_CXX17))",
     "if(HAVE_GLOO AND ((DEFINED Tensorflow_CXX17 AND Tensorflow_CXX17) OR "
     "(DEFINED Pytorch_CXX17 AND Pytorch_CXX17)))",
     "build the C++17 gloo for torch too (PR #3998)")
edit("CMakeLists.txt",
     "    if (Tensorflow_CXX11)\n        target_compile_definitions(compatible17_gloo PRIVATE _GLIBCXX_USE_CXX11_ABI=1)",
     "    if (Tensorflow_CXX11 OR Pytorch_CXX11)\n        target_compile_definitions(compatible17_gloo PRIVATE _GLIBCXX_USE_CXX11_ABI=1)",
     "C++11 ABI for the C++17 gloo when torch uses it (PR #3998)")

# 2. horovod/tensorflow/xla_mpi_ops.cc includes TF's XLA headers, which with TF >= 2.16 pull in
#    highwayhash/arch_specific.h (shipped only under include/external/highwayhash) and fail to
#    compile. Everything in the file except those includes is inside #if HAVE_GPU (the XLA
#    custom calls are GPU-only), so a CPU build compiles it to nothing: skip the whole file
#    unless HAVE_GPU. GPU builds are unchanged.
edit("horovod/tensorflow/xla_mpi_ops.cc",
     "#if TENSORFLOW_VERSION >= 2006000000\n",
     "#if TENSORFLOW_VERSION >= 2006000000 && HAVE_GPU  // patched: XLA ops are GPU-only\n",
     "skip the GPU-only XLA ops in CPU builds")

# 4. A process set's Gloo context (every Horovod job makes one for the global set) creates its
#    device from its own, still empty, interface name instead of the global context's, so it
#    binds whatever the host name resolves to: 127.0.1.1 on a Debian-style /etc/hosts, and ranks
#    on other nodes cannot connect. Use the interface HOROVOD_GLOO_IFACE gave the global context.
edit("horovod/common/gloo/gloo_context.cc",
     "  attr device_attr;\n  device_attr.iface = gloo_iface_;\n  device_attr.ai_family = AF_UNSPEC;\n"
     "  auto dev = CreateDevice(device_attr);\n\n  global_ctx = global_context.ctx;\n",
     "  gloo_iface_ = global_context.gloo_iface_;  // patched: the global context's interface\n"
     "  attr device_attr;\n  device_attr.iface = gloo_iface_;\n  device_attr.ai_family = AF_UNSPEC;\n"
     "  auto dev = CreateDevice(device_attr);\n\n  global_ctx = global_context.ctx;\n",
     "process-set Gloo contexts bind the global context's interface")
PATCH

  # (plain nproc would answer 1 here: it honours the OMP_NUM_THREADS=1 set above)
  JOBS=${HOROVOD_BUILD_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2)}
  log "building the wheel (-j$JOBS; minutes: ~4 on 2 fast cores, up to ~20 on slow ones); full log: $BUILD_LOG"
  start=$(date +%s)
  mkdir -p "$WORK/wheel"
  # CMAKE_POLICY_VERSION_MINIMUM: lets a CMake >= 4 configure the bundled gloo (ignored by 3.x).
  if ! env HOROVOD_WITH_PYTORCH=1 "$TF_BUILD" HOROVOD_WITH_GLOO=1 \
         HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
         ${GPU_OPS:+HOROVOD_GPU_OPERATIONS=$GPU_OPS} \
         CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$JOBS" \
         "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/wheel" "$SRC" \
         >"$BUILD_LOG" 2>&1; then
    log "build failed after $(( $(date +%s) - start ))s; first errors in $BUILD_LOG:"
    grep -nE "error:|Error [0-9]|CMake Error|CalledProcessError" "$BUILD_LOG" \
      | grep -v "subprocess-exited-with-error" | head -n 20 | cut -c1-400 >&2 || true
    log "last 40 lines of $BUILD_LOG:"
    tail -n 40 "$BUILD_LOG" >&2
    die "horovod $HVD_VERSION did not build (full log: $BUILD_LOG)"
  fi
  built=$(ls "$WORK"/wheel/horovod-"$HVD_VERSION"-*.whl 2>/dev/null | head -n1)
  [ -n "$built" ] || die "pip wheel succeeded but left no horovod wheel (log: $BUILD_LOG)"
  # Fill the cache atomically: a half-copied wheel must never look like a cached one.
  mkdir -p "$WHEEL_DIR"
  cp "$built" "$WHEEL_DIR/.partial.whl"
  mv "$WHEEL_DIR/.partial.whl" "$WHEEL_DIR/$(basename "$built")"
  cp "$BUILD_LOG" "$WHEEL_DIR/build.log"
  WHEEL=$(find_wheel)
  log "built in $(( $(date +%s) - start ))s: $WHEEL ($(du -h "$WHEEL" | cut -f1))"
fi

# --- install -----------------------------------------------------------------------------------
# Skip when exactly this wheel is already installed: pip records the wheel's sha256.
WHEEL_SHA=$(sha256sum "$WHEEL" | cut -d' ' -f1)
installed_sha=$("$PY" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md, json
d = md.distribution("horovod")
info = json.loads(d.read_text("direct_url.json") or "{}").get("archive_info", {})
print(d.version, info.get("hashes", {}).get("sha256", ""))
EOF
)
INSTALLED_NOW=0
if [ "$installed_sha" = "$HVD_VERSION $WHEEL_SHA" ]; then
  log "horovod $HVD_VERSION already installed from the cached wheel"
else
  log "installing $(basename "$WHEEL")"
  "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL" || die "pip install of $WHEEL failed"
  INSTALLED_NOW=1
fi

# Horovod's own runtime requirements (the wheel's unconditional Requires-Dist, e.g. cloudpickle,
# psutil, pyyaml, packaging, cffi) plus numpy; only the missing ones are installed.
missing=$("$PY" - "$WHEEL" <<'EOF'
import importlib.metadata as md
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
reqs = [l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Dist:")]
reqs = [r for r in reqs if ";" not in r] + ["numpy"]  # markers: extras / old Pythons only
try:
    from packaging.requirements import Requirement
except ImportError:  # packaging itself missing: let pip sort all of them out
    print(" ".join(reqs))
    sys.exit()
for r in reqs:
    req = Requirement(r)
    try:
        ok = req.specifier.contains(md.version(req.name), prereleases=True)
    except md.PackageNotFoundError:
        ok = False
    if not ok:
        print(r)
EOF
) || die "could not read the wheel's requirements"
if [ -n "$missing" ]; then
  log "installing horovod's runtime requirements: $(echo $missing)"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $missing || die "pip install of $missing failed"
fi

# --- verify ------------------------------------------------------------------------------------
# Full checks (check-build + 2-process allreduce, ~1 min, mostly TensorFlow imports) after every
# install; when this wheel was already installed and passed them before, only the import check
# runs. HOROVOD_VERIFY=full forces the full checks.
STAMP="$WHEEL_DIR/verified"
HOROVODRUN="$SCRIPTS_DIR/horovodrun"
[ -x "$HOROVODRUN" ] || HOROVODRUN=$(command -v horovodrun) || die "horovodrun not found"

log "verifying: import $(for fw in $FRAMEWORKS; do printf 'horovod.%s ' "$fw"; done)"
"$PY" -c "import horovod.torch$([ "$TF_VER" != none ] && echo '; import horovod.tensorflow')" >"$WORK/import.log" 2>&1 \
  || { tail -n 30 "$WORK/import.log" >&2; die "horovod does not import"; }

if [ "$INSTALLED_NOW" = 0 ] && [ "${HOROVOD_VERIFY:-auto}" != full ] \
   && [ "$(cat "$STAMP" 2>/dev/null)" = "$WHEEL_SHA $PY_EXE" ]; then
  log "ok: horovod $HVD_VERSION (torch $TORCH_VER, tensorflow $TF_VER, gloo${GPU_OPS:+, $GPU_OPS}) installed; full checks passed before (HOROVOD_VERIFY=full reruns them)"
  exit 0
fi

"$HOROVODRUN" --check-build >"$WORK/check-build.txt" 2>&1 \
  || { cat "$WORK/check-build.txt" >&2; die "horovodrun --check-build failed"; }
# (only the report: TensorFlow's start-up log lines come before it)
sed -n '/^Horovod v/,$p' "$WORK/check-build.txt" | sed -e 's/[[:space:]]*$//' -e '/^$/d' -e 's/^/[horovod]   /' >&2
for want in PyTorch $([ "$TF_VER" != none ] && echo TensorFlow) Gloo $GPU_OPS; do
  grep -q "\[X\] $want" "$WORK/check-build.txt" || die "horovodrun --check-build does not list $want"
done

cat >"$WORK/allreduce_check.py" <<'EOF'
# One framework per process: horovod.torch and horovod.tensorflow each carry their own runtime.
import sys

framework = sys.argv[1]
if framework == "torch":
    import torch
    import horovod.torch as hvd

    hvd.init()
    n, r = hvd.size(), hvd.rank()
    t = torch.full((1000,), float(r + 1))
    avg = hvd.allreduce(t, name="avg")  # op defaults to Average
    tot = hvd.allreduce(t, op=hvd.Sum, name="sum")
    got_avg, got_sum = avg.numpy(), tot.numpy()
else:
    import tensorflow as tf
    import horovod.tensorflow as hvd

    hvd.init()
    n, r = hvd.size(), hvd.rank()
    t = tf.fill([1000], float(r + 1))
    got_avg = hvd.allreduce(t, op=hvd.Average, name="avg").numpy()
    got_sum = hvd.allreduce(t, op=hvd.Sum, name="sum").numpy()

assert n == 2, f"expected 2 ranks, got {n}"
want_avg, want_sum = (n + 1) / 2, n * (n + 1) / 2
assert (abs(got_avg - want_avg) < 1e-6).all(), (got_avg[:3], want_avg)
assert (abs(got_sum - want_sum) < 1e-6).all(), (got_sum[:3], want_sum)
print(f"HVDCHECK {framework} rank {r}/{n}: allreduce average {got_avg[0]} sum {got_sum[0]} OK")
EOF

for fw in $FRAMEWORKS; do
  log "verifying: horovodrun -np 2 -H localhost:2 --gloo (horovod.$fw allreduce)"
  if ! timeout 300 "$HOROVODRUN" -np 2 -H localhost:2 --gloo \
         "$PY_EXE" "$WORK/allreduce_check.py" "$fw" >"$WORK/run-$fw.log" 2>&1; then
    tail -n 40 "$WORK/run-$fw.log" >&2
    die "2-process horovod.$fw allreduce check failed"
  fi
  [ "$(grep -c "HVDCHECK $fw rank .* OK" "$WORK/run-$fw.log")" = 2 ] \
    || { tail -n 40 "$WORK/run-$fw.log" >&2; die "2-process horovod.$fw check: not both ranks reported OK"; }
  grep -o "HVDCHECK .*OK" "$WORK/run-$fw.log" | sed 's/^HVDCHECK /[horovod]   /' >&2
done
echo "$WHEEL_SHA $PY_EXE" >"$STAMP"
log "ok: horovod $HVD_VERSION (torch $TORCH_VER, tensorflow $TF_VER, gloo${GPU_OPS:+, $GPU_OPS}) works"
