#!/usr/bin/env bash
# Set up specgrove on a fresh machine: a virtual environment in .venv with the package, its test
# and ray extras and PyTorch's CPU build (torch==2.13.0), build the C++ kernels (GGUF blocks, batch-invariant
# attention; g++ and ninja), then fetch, verify (SHA-256) and convert the default models into
# ~/.cache/specgrove (or $SPECGROVE_CACHE). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,ray]'
.venv/bin/python -m specgrove.kernels.build  # the C++ kernels of the default CPU path, built once
.venv/bin/python -c "from specgrove.models.defaults import ensure_defaults; ensure_defaults()"
