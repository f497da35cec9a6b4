#!/usr/bin/env bash
# The device check of the triton backend, for a GPU machine with no network and its own PyTorch,
# Triton and transformers: runs the package from this working tree (PYTHONPATH), never installs.
#   1. the triton kernels' tests (tests/test_triton_kernels.py, tests/test_cuda_graph.py) at realistic
#      shapes on the GPU, against their torch references;
#   2. benchmarks/gpu_check.py: one JSON line per figure (see its docstring), within --budget-s.
# Usage: bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --only scan,moe]
# Everything it prints also goes to $OUT/gpu_check.log when OUT is set (the device tool's folder).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_check.log
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'
  # -p no:cacheprovider: nothing written into the tree; -x not set: every kernel's result is wanted
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_triton_kernels.py tests/test_cuda_graph.py
  echo "tests exit code: $?"
  timeout 480 "$PY" benchmarks/gpu_check.py "$@"
  echo "gpu_check.py exit code: $?"
} 2>&1 | tee "$LOG"
