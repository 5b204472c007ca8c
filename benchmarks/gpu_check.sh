#!/usr/bin/env bash
# The single device command: from a fresh copy of the repository on the GPU machine's image (Python 3.12, torch 2.11
# with CUDA 13, triton 3.6, numpy 2.5, pybind11, ninja, nvcc 13, pytest, no network), build and install the package
# with its CUDA extension for sm_90a only, then run benchmarks/run_all.py: environment, ceilings, the GPU tests and
# every benchmark, about 8 minutes on an H200 in all.
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/<gpu>/<date>-<commit>/
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# With $OUT set (the device tool's output folder, which brings back at most 8 files), $OUT receives results.json,
# results.md, tests.xml, auto_table.json (the committed auto table with the rows this run timed ordered by its
# measurements), gpu_check.log (build + run output) and results.tar.gz (the whole results folder: plots, logs).
# Wheels in .whl/ (packages the image lacks, e.g. kornia for the data benchmark's augment rows) are installed first,
# offline. Exit status: that of run_all.py (1: a GPU test failed; 2: the GPU tests could not run; 4: a phase
# crashed), or 3 if the build failed (run_all.py still runs, on the Triton and reference backends); every result is
# written in all cases.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
ROOT=$(pwd)
PY=${PYTHON:-python3}
TOTAL_S=${DINOV3_CHECK_SECONDS:-480}   # the whole command, build included
START=$(date +%s)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1

WORK=${DINOV3_RESULTS_DIR:-}
if [ -n "${OUT:-}" ] && [ -z "$WORK" ]; then
    WORK=$(mktemp -d /tmp/dinov3-gpu-check.XXXXXX)
fi
LOG=$(mktemp /tmp/dinov3-gpu-check-log.XXXXXX)
say() { echo "gpu_check: $*" | tee -a "$LOG"; }

say "python $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1)"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("torch", "triton", "numpy", "pybind11", "ninja", "setuptools", "wheel", "pytest", "matplotlib", "kornia",
             "PIL", "yaml", "safetensors"):
    try:
        print(f"  {name:12s} {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as exc:  # noqa: BLE001
        print(f"  {name:12s} MISSING ({type(exc).__name__})")
import torch
print("  cuda", torch.version.cuda, "| GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
(command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc not found") 2>&1 | tee -a "$LOG"
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem \
    --format=csv || echo "nvidia-smi not found") 2>&1 | tee -a "$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing carried wheels: $(ls .whl)"
    $PY -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl 2>&1 | tee -a "$LOG"
fi

# Build: sm_90a only (Hopper's own instructions; the H100/H200), no network, no build isolation (the image has the
# build requirements), no dependency resolution (the image's torch/triton/numpy are the ones to test).
say "building and installing (DINOV3_CUDA_ARCHS=9.0a)"
BUILD_START=$(date +%s)
DINOV3_CUDA_ARCHS=9.0a MAX_JOBS=${MAX_JOBS:-16} \
    $PY -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir . 2>&1 | tee -a "$LOG"
BUILD_RC=${PIPESTATUS[0]}
export DINOV3_BUILD_SECONDS=$(( $(date +%s) - BUILD_START ))
# The installed package must import its extension from outside the source tree (which has no _C).
(cd /tmp && $PY -c "import dinov3_kernels._C as C, dinov3_kernels; print('extension', C.__file__)") 2>&1 | tee -a "$LOG"
EXT_RC=${PIPESTATUS[0]}
if [ "$BUILD_RC" -ne 0 ] || [ "$EXT_RC" -ne 0 ]; then
    export DINOV3_BUILD_STATUS="failed (pip $BUILD_RC, import $EXT_RC)"
else
    export DINOV3_BUILD_STATUS=ok
fi
say "build: $DINOV3_BUILD_STATUS in ${DINOV3_BUILD_SECONDS} s"

# What is left of the budget goes to run_all.py, minus a margin for packing; timeout stops a hang well inside the
# device's 10-minute limit per command.
LEFT=$(( TOTAL_S - ($(date +%s) - START) - 15 ))
[ "$LEFT" -lt 120 ] && LEFT=120
ARGS=(--budget-s "$LEFT")
[ -n "$WORK" ] && ARGS+=(--out "$WORK")
# DINOV3_RUN_ALL_ARGS adds arguments (e.g. --dry-run, to try this script on a machine without a GPU).
read -r -a EXTRA <<< "${DINOV3_RUN_ALL_ARGS:-}"
ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
say "run_all.py ${ARGS[*]}"
timeout --kill-after=10 $(( LEFT + 90 )) $PY benchmarks/run_all.py "${ARGS[@]}" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
[ "$RC" -eq 124 ] && say "run_all.py timed out: results.json holds the phases that finished"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for f in results.json results.md tests.xml auto_table.json; do
        [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
    done
    cp "$LOG" "$WORK/gpu_check.log" 2>/dev/null
    tar -czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null
    cp "$LOG" "$OUT/gpu_check.log"
    say "copied the results to $OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
say "done in $(( $(date +%s) - START )) s, run_all.py exit $RC, build $DINOV3_BUILD_STATUS (log: $LOG)"
[ "$RC" -ne 0 ] && exit "$RC"
[ "$DINOV3_BUILD_STATUS" != ok ] && exit 3
exit 0
