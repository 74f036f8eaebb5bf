#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py): run on the GPU machine from any directory, with
# .cache/gpu_data carried there (`python -m bench.gpu_check --pack` makes it, 12 MB). Prints a
# table; writes $OUT/gpu_check.json (bench/ when OUT is unset). Stops itself after 330 s.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
"${PYTHON:-python3}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
OUT="${OUT:-bench}" timeout 330 "${PYTHON:-python3}" -m bench.gpu_check "$@"
