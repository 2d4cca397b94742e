#!/usr/bin/env bash
# One GPU session: every `gpu`-marked test, then the training-step benchmark on CUDA.
#
# Installs nothing. Uses $PYTHON (default: .venv/bin/python if it has CUDA torch, else python3),
# with src/ on PYTHONPATH; if pytest/hypothesis/einops are missing on the machine, the pure-Python
# copies in build/gpu_pylib (copied from the dev venv; carry that folder) are appended to PYTHONPATH
# (hypothesis there has a CPython 3.11 extension: the fallback only works on Python 3.11).
# Budget: under 8 minutes in total (each stage has its own `timeout`). Logs go to $OUT (if set)
# or results/gpu_check/.
#
# Usage:  bash benchmarks/gpu_check.sh            # full check (~3-6 min on one H100)
#         QUICK=1 bash benchmarks/gpu_check.sh    # benchmark with --quick
set -u
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-results/gpu_check}"
mkdir -p "$LOG_DIR"
START=$(date +%s)

if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PYTHON=.venv/bin/python
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import pytest, hypothesis, einops" 2>/dev/null && [ -d build/gpu_pylib ]; then
    export PYTHONPATH="$PYTHONPATH:$PWD/build/gpu_pylib"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

echo "== nvidia-smi"
nvidia-smi || echo "nvidia-smi not available"
echo "== python / torch"
"$PYTHON" - <<'EOF'
import sys, torch
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
EOF

echo "== pytest -m gpu (limit 300 s)"
timeout 300 "$PYTHON" -m pytest -m gpu -q -rfEsx -p no:cacheprovider \
    --continue-on-collection-errors -o junit_family=legacy --junitxml="$LOG_DIR/gpu_tests.xml" \
    $(grep -rl --include='test_*.py' "mark.gpu" tests | sort) \
    2>&1 | tee "$LOG_DIR/gpu_tests.log" | tail -60
TEST_RC=${PIPESTATUS[0]}

echo "== benchmarks/train_step.py --device cuda (limit 150 s)"
BENCH_ARGS=(--device cuda)
if [ -n "${QUICK:-}" ]; then BENCH_ARGS+=(--quick); fi
timeout 150 "$PYTHON" benchmarks/train_step.py "${BENCH_ARGS[@]}" 2>&1 | tee "$LOG_DIR/train_step.log"
BENCH_RC=${PIPESTATUS[0]}

echo "== done in $(( $(date +%s) - START )) s: pytest rc=$TEST_RC, benchmark rc=$BENCH_RC"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
