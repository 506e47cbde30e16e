#!/usr/bin/env bash
# One call on one H100: the fused QK-norm + RoPE kernel checked against eager on the GPU, then the 720p DiT
# step of hvlab (FP8, bf16) and diffusers in one run (benchmarks/bench_dit.py). diffusers comes from .whl.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dif .whl/*.whl \
  > /tmp/pip.log 2>&1 || echo "wheel install failed"
PYTHONPATH=$PWD timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fused.py 2>&1 | tail -4
PYTHONPATH=$PWD:/tmp/dif timeout 420 python3 benchmarks/bench_dit.py --sizes 720p --impls hvlab-fp8,diffusers,hvlab-bf16 \
  --steps 1 --out "${OUT:-outputs}" 2>&1 | grep -v "^{" | tail -12
