#!/usr/bin/env bash
# The one command a GPU machine runs (issue 17): proves and times the CUDA path and writes
# gpu_check.json, gpu_check.log, pytest_cuda.xml, profile.txt and nvidia-smi.txt into OUT.
#
#   bash benchmarks/gpu_check.sh "$OUT/gpu_check" [more benchmarks/gpu_check.py options]
#
# From the repository root or anywhere. PYTHON: the interpreter (default python3, else
# python); LIMIT: gpu_check.py's own hard limit in seconds (default 480), which `timeout`
# backs 45 s later; WHEELS: a folder of wheels for what the machine lacks (the docstring of
# gpu_check.py says how to get them).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]}"
shift
py="${PYTHON:-$(command -v python3 || command -v python)}"
limit="${LIMIT:-480}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
args=(--out "$out" --time-limit "$limit")
if [ -n "${WHEELS:-}" ]; then
  args+=(--wheels "$WHEELS")
fi
PYTHONUNBUFFERED=1 timeout -k 10 "$((${limit%.*} + 45))" "$py" benchmarks/gpu_check.py \
  "${args[@]}" "$@"
rc=$?
echo "gpu_check.sh: exit status $rc" >> "$out/gpu_check.log"
exit "$rc"
