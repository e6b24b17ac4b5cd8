#!/usr/bin/env bash
# specjax on an accelerator, in one run (issue 13, point 7): see benchmarks/device_check.py.
#   bash benchmarks/device_check.sh            # NVIDIA GPU: everything, in under 8 minutes
#   bash benchmarks/device_check.sh --tiny     # tiny shapes, float32: the code path on CPU
# With no GPU (and no --tiny) it says so and exits 0. The timeout keeps the run under 8 minutes
# even if a compile hangs; every section prints as it finishes, so a cut run still shows them.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the 8B model + caches fit; leave room for Triton
# python3 first: on the GPU image a plain `python` may be missing or another interpreter.
PY=$(command -v python3 || command -v python)
timeout --signal=INT 470 "$PY" -u benchmarks/device_check.py "$@"
rc=$?
[ "$rc" = 124 ] && echo "device_check: stopped at the 470 s limit (sections above are complete)"
exit "$rc"
