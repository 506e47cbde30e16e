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
# Notebooks (scripts/nbstrip.py): a git clean filter keeps outputs, execution counts and JupyterLab's kernel
# metadata out of commits and diffs (.gitattributes); a Jupyter pre-save hook keeps them out of the tracked files
# in notebooks/ (git would still list a notebook whose size changed), so running the course leaves `git status` clean.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git config filter.nbstrip.clean "$PY scripts/nbstrip.py"
fi
mkdir -p .venv/etc/jupyter
cat > .venv/etc/jupyter/jupyter_server_config.py <<EOF
# Written by scripts/setup.sh: notebooks in $PWD/notebooks are saved without outputs (scripts/nbstrip.py).
import sys
sys.path.insert(0, "$PWD/scripts")
from nbstrip import pre_save_hook_for
c.ContentsManager.pre_save_hook = pre_save_hook_for("$PWD/notebooks")
EOF
