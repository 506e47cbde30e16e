#!/usr/bin/env bash
# The test command (README, CI): set-up, then the test suite, every notebook under nbmake,
# the docs site built with --strict, and the site's browser check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# two pytest workers on two cores: one torch thread each, or they oversubscribe the cores 4x
export MPLBACKEND=Agg PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
python -m pytest -q -rs -n 2 --dist loadfile tests "$@"   # -rs: every skip with its reason
if [ -z "${HVLAB_SKIP_NOTEBOOKS:-}" ] && ls notebooks/*.ipynb >/dev/null 2>&1; then
  python scripts/check_notebooks.py notebooks        # committed notebooks carry no outputs
  # every notebook under nbmake, run once: on copies in build/ that keep their outputs for the docs site
  python scripts/execute_notebooks.py -n 2 --timeout 900
fi
if [ -z "${HVLAB_SKIP_DOCS:-}" ] && [ -f mkdocs.yml ] && [ -x scripts/check_site.sh ]; then
  bash scripts/check_site.sh
fi
