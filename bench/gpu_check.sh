#!/usr/bin/env bash
# GPU check (issue 12): prove the CUDA path in one bounded command, results as files.
#
#   bash bench/gpu_check.sh             # on a CUDA machine: <= 8 min, results in $OUT or gpu_results/
#   bash bench/gpu_check.sh --dry-run   # the same parts on CPU, CI-sized, no install
#
# Thin wrapper: the logic is `python -m bench.gpu` (bench/gpu/check.py). Any python3 can drive
# it (the driver needs only the standard library); it picks the Python with CUDA torch itself.
# The outer `timeout` is a last resort: every part already has its own limit.
set -uo pipefail
cd "$(dirname "$0")/.."

py="${GPU_CHECK_DRIVER:-}"
if [ -z "$py" ]; then
  for cand in .venv/bin/python "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" python3 python; do
    if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
if [ -z "$py" ]; then echo "gpu_check: no python3 found" >&2; exit 127; fi

budget=460
for arg in "$@"; do [ "$arg" = "--dry-run" ] && budget=300; done
exec timeout -k 10 $((budget + 15)) "$py" -m bench.gpu --budget "$budget" "$@"
