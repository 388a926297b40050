#!/usr/bin/env bash
# One-command GPU check of commlib's native CUDA path (under 5 minutes on one GPU):
#   1. builds the extension in place with the CUDA kernels (setup.py adds them when torch is a
#      CUDA build and nvcc is found; the build log says which);
#   2. runs scripts/gpu_check.py: the CUDA kernels against the CPU kernels bit for bit, commlib's
#      DDP hook on CUDA tensors over NCCL (one process per visible GPU) against the same hook on
#      the CPU, and the sparse-pack kernels against the device's copy bandwidth; before it, the
#      hook's CUDA stream-order test (tests/test_ddp_cuda_streams.py).
# Usage: scripts/gpu_check.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" - <<'PYEOF'
import sys, torch
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit(f"gpu_check: needs a CUDA build of torch and a visible GPU (torch {torch.__version__}, "
             f"cuda {torch.version.cuda}, available {torch.cuda.is_available()})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0)}")
PYEOF
mkdir -p .tmp
echo "== building commlib._native with CUDA (log: .tmp/gpu_check_build.log)"
start=$(date +%s)
if ! COMMLIB_BUILD_CUDA=1 PYTHONPATH="$PWD" "$PY" setup.py build_ext --inplace > .tmp/gpu_check_build.log 2>&1; then
  tail -40 .tmp/gpu_check_build.log; exit 1
fi
grep -E "commlib setup:" .tmp/gpu_check_build.log || true
echo "== built in $(( $(date +%s) - start )) s"
PYTHONPATH="$PWD" "$PY" -c "from commlib import ops; print('native path:', ops.native_status())"
echo "== the hook's clear ordered before its callback on CUDA (tests/test_ddp_cuda_streams.py)"
PYTHONPATH="$PWD" timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_ddp_cuda_streams.py
PYTHONPATH="$PWD" timeout 280 "$PY" scripts/gpu_check.py
