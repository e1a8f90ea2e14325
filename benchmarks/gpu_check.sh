#!/usr/bin/env bash
# The GPU check of the triton backend, in one run of at most ~8 minutes, offline:
#   1. the GPU tests for real (pytest -m gpu), compiled kernels on the device;
#   2. the triton test file compiled on the GPU (no interpreter): odd shapes, both paths;
#   3. the benchmark runner (batchnorm bench --device cuda): ours vs torch eager vs
#      torch.compile on ResNet-50's BN shapes at batch 256, NCHW and channels-last,
#      bfloat16 then float32, each with half of the time left.
# Everything lands in OUT_DIR (default gpu-results/): env.txt, pytest-*.txt,
# bench-bfloat16/ and bench-float32/ (results.md, the table, and results.csv),
# bench-*.log, summary.txt.
#
# usage: bash benchmarks/gpu_check.sh [OUT_DIR]
#        GPU_CHECK_TOTAL_S=470 (the whole run's budget, seconds)
#        GPU_CHECK_DRY=1 (no GPU: runs the same steps on CPU, a tiny benchmark; for testing this script)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-results}"
mkdir -p "$OUT"
TOTAL_S="${GPU_CHECK_TOTAL_S:-470}"
START=$(date +%s)
left() { echo $((TOTAL_S - ($(date +%s) - START))); }
cap() { local want=$1 rest; rest=$(($(left) - ${2:-0})); echo $((want < rest ? want : (rest > 10 ? rest : 10))); }

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # works without installing the package
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# the automatic choice gives CUDA tensors torch's own kernels until this check has passed on a GPU:
# force the backend under test
export BATCHNORM_BACKEND=triton

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 || true
    python - <<'EOF'
import sys
import torch
import triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| triton", triton.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
from batchnorm import kernels
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    if torch.cuda.is_available():
        x = torch.ones(2, 3, 4, device="cuda", dtype=dtype)
        print(f"backend for a CUDA {dtype} tensor (BATCHNORM_BACKEND=triton): {kernels.select(x).name}")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
if python -c "import pytest" 2>/dev/null; then
    echo "== pytest -m gpu (cap $(cap 140 300) s)"
    timeout "$(cap 140 300)" python -m pytest tests -m gpu -q -rs -p no:cacheprovider \
        --continue-on-collection-errors >"$OUT/pytest-gpu.txt" 2>&1
    rc=$?
    echo "exit status $rc" >>"$OUT/pytest-gpu.txt"
    tail -n 15 "$OUT/pytest-gpu.txt"
    [ "$rc" -ne 0 ] && status=1
    echo "== tests/kernels/test_triton.py compiled on the GPU, float32 and bfloat16 (cap $(cap 100 220) s)"
    timeout "$(cap 100 220)" python -m pytest tests/kernels/test_triton.py -m "not gpu" -k "not dtype2" -q -rs \
        -p no:cacheprovider >"$OUT/pytest-triton-compiled.txt" 2>&1
    rc=$?
    echo "exit status $rc" >>"$OUT/pytest-triton-compiled.txt"
    tail -n 15 "$OUT/pytest-triton-compiled.txt"
    [ "$rc" -ne 0 ] && status=1
else
    echo "pytest is not installed here: tests not run" | tee "$OUT/pytest-gpu.txt"
    status=1
fi

dry=()
[ "${GPU_CHECK_DRY:-0}" = 1 ] && dry=(--dry-run --no-compile)
for dtype in bfloat16 float32; do
    # bfloat16 gets half of what is left, float32 the rest; the runner starts no new work past its
    # budget (torch.compile last), keeps going past a failing case, and rewrites its table after each
    if [ "$dtype" = bfloat16 ]; then budget=$((($(left) - 40) / 2)); else budget=$(($(left) - 25)); fi
    [ "$budget" -lt 10 ] && budget=10
    echo "== benchmark, $dtype (budget ${budget} s)"
    timeout "$((budget + 15))" python benchmarks/run.py --device cuda --dtype "$dtype" --batch 256 --cases r50 \
        --modes train-fwd,train-fwdbwd,eval --repeats 5 --kernels --keep-going --no-memory --budget-s "$budget" \
        --out "$OUT/bench-$dtype" "${dry[@]}" 2>&1 | tee "$OUT/bench-$dtype.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && status=1
done

{
    echo "gpu_check: $(($(date +%s) - START)) s, exit status $status"
    grep -h -E "passed|failed|error" "$OUT"/pytest-*.txt | tail -n 4
    for dtype in bfloat16 float32; do
        echo "benchmark, $dtype:"
        sed -n '/^- /p' "$OUT/bench-$dtype/results.md" 2>/dev/null
    done
} | tee "$OUT/summary.txt"
exit "$status"
