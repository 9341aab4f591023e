#!/usr/bin/env bash
# The device checks for a lent GPU machine (see docs/architecture.md): the tiny-model test suites on CUDA
# and the runtime timing with random weights in the 1.5B target's shape. Writes logs under $OUT.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
SPECGROVE_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m "not integration" \
  tests/test_runtime.py tests/test_exactness.py tests/test_sorted.py tests/test_trees.py tests/test_engine.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
timeout 120 python3 scripts/cuda_timing.py --dtype bfloat16 2>&1 | tee "$OUT/cuda_timing.log"
