#!/usr/bin/env bash
# The main job (README): set-up, then generate a video with the shipped toy model on the CPU.
# Usage: bash scripts/demo.sh ["a red circle moving right"] [extra `hvlab generate` flags]
# Seed 0, the README's example (a --seed among the extra flags replaces it: the last one counts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
prompt=${1:-"a red circle moving right"}
shift || true
hvlab generate "$prompt" --seed 0 "$@"
