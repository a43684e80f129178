#!/usr/bin/env bash
# The paper dry run on a GPU machine (issue 24): install the carried wheels, then run
# benchmarks/paper_dry_run.py (every stage of dvc.yaml at the paper's sizes on random weights).
#
#   bash scripts/gpu_dry_run.sh OUT_DIR [more benchmarks/paper_dry_run.py options]
#
# From the repository root or anywhere. WHEELS: the folder scripts/gpu_wheels.sh filled
# (default .whl; name it in the device tool's `carry`), installed with pip --no-index into
# /tmp/hsae-site, which goes first on PYTHONPATH; PYTHON: the interpreter (default python3);
# LIMIT: the dry run's own hard limit in seconds (default 330), which `timeout` backs 60 s later.
# Writes paper_dry_run.json, paper_dry_run.md, pipeline.log, nvidia-smi.txt and pip.log into
# OUT_DIR; exit status 0 when every stage ran.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash scripts/gpu_dry_run.sh OUT_DIR [paper_dry_run.py options]}"
shift
py="${PYTHON:-python3}"
limit="${LIMIT:-330}"
wheels="${WHEELS:-.whl}"
site=/tmp/hsae-site
mkdir -p "$out"
if compgen -G "$wheels/*.whl" >/dev/null; then
  if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$site" "$wheels"/*.whl >"$out/pip.log" 2>&1; then
    echo "gpu_dry_run.sh: installing the wheels of $wheels failed:" >&2
    tail -20 "$out/pip.log" >&2
    exit 3
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_dry_run.sh: $(ls "$wheels"/*.whl | wc -l) wheels installed into $site"
else
  echo "gpu_dry_run.sh: no wheels in $wheels: using what $py has" >&2
fi
PYTHONUNBUFFERED=1 timeout -k 10 "$((${limit%.*} + 60))" "$py" benchmarks/paper_dry_run.py \
  --out "$out" --time-limit "$limit" --modules "$@"
rc=$?
echo "gpu_dry_run.sh: exit status $rc"
exit "$rc"
