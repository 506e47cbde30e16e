#!/usr/bin/env bash
# One call on one H100: the fused kernels' GPU tests, their microbenchmark at the 720p shapes, then the 720p DiT
# step of hvlab (FP8, bf16) and diffusers in one run (benchmarks/bench_dit.py) with the fastest norm_rope setting.
# diffusers comes from .whl (see /work/.library/device/README.md on carrying wheels).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-outputs}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dif .whl/*.whl \
  > /tmp/pip.log 2>&1 || echo "wheel install failed"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_fp8.py -k "gpu or interpreter" 2>&1 | tail -6
timeout 120 python3 scripts/gpu/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.txt" | grep -v Warn
best=$(grep BEST_NORM_ROPE "$OUT/bench_kernels.txt" | awk '{print $2, $3}')
PYTHONPATH=$PWD:/tmp/dif timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_dit.py --sizes 720p \
  --impls ${IMPLS:-hvlab-fp8,diffusers,hvlab-bf16} --steps ${STEPS:-1} --norm-rope ${best:-split 4} --out "$OUT" 2>&1 \
  | grep -v "^{" | tail -12
