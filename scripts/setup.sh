#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch and every
# dependency hvlab, its tests, notebooks and docs need. Safe to run again; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.hvlab-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch 2.13.0: the CPU build on local disk here; a bare `torch` could pull a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
  python -m pip install -q -e ".[notebooks,test,docs]"
  # Data files only (Llama-3 tiktoken BPE, CLIP BPE vocabulary); see pyproject.toml.
  python -m pip install -q --no-deps "llama-models>=0.3" "open-clip-torch>=2.24"
  touch "$stamp"
fi
