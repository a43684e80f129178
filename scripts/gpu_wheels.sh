#!/usr/bin/env bash
# Download the wheels a GPU machine of the device tool lacks for benchmarks/paper_dry_run.py
# (benchmarks/gpu_wheels.txt: the store's zarr stack, DVC + DVCLive, umap-learn) for its Python,
# CPython 3.12 on manylinux x86_64, into DIR (default .whl/, ignored by git; the device tool's
# `carry` takes it along). Run it here, where pip reaches the registries:
#
#   bash scripts/gpu_wheels.sh [DIR]
#
# PYTHON: the pip to use (default .venv/bin/python); GPU_PYTHON_VERSION: the target's Python
# (default 3.12, KINDS.md's). A requirement with no wheel on the index (antlr4-python3-runtime,
# pure Python) is built into a wheel here. Ends with the folder's size (the working tree that
# travels, wheels included, must stay under 64 MiB) and fails if a project has two wheels
# (pip --no-index would refuse the whole install).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
py="${PYTHON:-.venv/bin/python}"
pyver="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p "$dir"
plat=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 \
           manylinux2014 manylinux1; do
  plat+=(--platform "${tag}_x86_64")
done
grep -v '^\s*\(#\|$\)' benchmarks/gpu_wheels.txt | while read -r req; do
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
       --implementation cp "${plat[@]}" -d "$dir" "$req" 2>/dev/null; then
    echo "gpu_wheels: no wheel of $req for CPython $pyver: building one (pure Python only)"
    "$py" -m pip wheel -q --no-deps --no-binary=:all: -w "$dir" "$req"
  fi
done
dupes=$(ls "$dir" | grep '\.whl$' | sed 's/-[0-9].*//' | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "gpu_wheels: more than one wheel of: $dupes (remove the old ones from $dir)" >&2
  exit 1
fi
echo "gpu_wheels: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
