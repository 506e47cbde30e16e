#!/usr/bin/env bash
# The docs site, end to end (called by scripts/test.sh; runs alone too, after scripts/setup.sh):
#   1. execute the notebooks whose executed copy in build/ is missing or stale (once, under nbmake;
#      after scripts/test.sh that is none),
#   2. mkdocs build --strict into site/ (the notebooks rendered with their outputs, the API reference),
#   3. serve site/ on a free localhost port and open the pages in headless Chromium: each must show a
#      rendered figure, log no console error and load nothing from outside localhost.
# Set HVLAB_SKIP_BROWSER=1 to stop after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export MPLBACKEND=Agg PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 NO_MKDOCS_2_WARNING=1

t0=$SECONDS
mkdir -p build
python scripts/execute_notebooks.py --stale
t1=$SECONDS
mkdocs build --strict --clean
t2=$SECONDS
echo "site: notebooks $((t1 - t0)) s, mkdocs build $((t2 - t1)) s"

if [ -n "${HVLAB_SKIP_BROWSER:-}" ]; then
  exit 0
fi

# Chromium and its WebDriver from Debian (CI runs as root on a fresh Debian machine).
CHROMIUM=${CHROMIUM:-$(command -v chromium || true)}
CHROMEDRIVER=${CHROMEDRIVER:-$(command -v chromedriver || true)}
if [ -z "$CHROMIUM" ] || [ -z "$CHROMEDRIVER" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver (Debian packages) ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    CHROMIUM=$(command -v chromium)
    CHROMEDRIVER=$(command -v chromedriver)
  else
    echo "the browser check needs Chromium and its driver: sudo apt-get install chromium chromium-driver" \
         "(or set CHROMIUM and CHROMEDRIVER; HVLAB_SKIP_BROWSER=1 skips the check)" >&2
    exit 1
  fi
fi

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python -m http.server "$port" --bind 127.0.0.1 --directory site >build/http.log 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
python scripts/check_site.py --base-url "http://127.0.0.1:$port/" --chromium "$CHROMIUM" --chromedriver "$CHROMEDRIVER"
echo "site: browser check $((SECONDS - t2)) s; total $((SECONDS - t0)) s"
