#!/usr/bin/env bash
# The device checks for a lent GPU machine (see docs/architecture.md): the tiny-model test suites on CUDA
# (CUDA graphs on by default there) and the runtime timing with random weights in the real models' shapes.
# Writes logs and JSON under $OUT.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
SPECGROVE_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m "not integration" \
  tests/test_cuda_graphs.py tests/test_quantization.py tests/test_runtime.py tests/test_exactness.py tests/test_batching.py \
  tests/test_engine.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
timeout "${TIMING_TIMEOUT:-200}" python3 scripts/cuda_timing.py --json "$OUT/cuda_timing.json" 2>&1 | tee "$OUT/cuda_timing.log"
