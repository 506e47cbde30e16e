#!/usr/bin/env bash
# Issue 17's GPU measurements, PENDING (no GPU was lent when this was written): four calls of <= 10 minutes
# on one H100 / H200 (sm90), each `CALL=n bash scripts/gpu/issue17.sh`. Carry the wheels in .whl/:
#   pip download fa3-fwd==0.0.3 --no-deps -d .whl     # FlashAttention-3 forward kernels, sm90, 27.6 MB
#   pip download diffusers==0.42.1 --no-deps -d .whl  # the baseline of bench_dit
#   1: the GPU tests of FA3 and the FP8 attention kernel, then the 720p DiT step: diffusers, hvlab bf16 (cuDNN),
#      hvlab FA3, hvlab FP8 GEMMs + FA3, hvlab FP8 GEMMs + FP8 attention, in one run
#   2: hvlab FP8 GEMMs (cuDNN) and FP8 GEMMs + INT8/bf16 attention; FP8 attention's error on the 13B DiT's q, k, v
#   3: the FP8 GEMM variants' full-depth output error at 720p
#   4: the per-layer-kind sensitivity sweep and the keep-bf16 variants at 720p
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-outputs}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/whl .whl/*.whl \
  > /tmp/pip.log 2>&1 || echo "wheel install failed (see /tmp/pip.log)"
export PYTHONPATH=$PWD:/tmp/whl
case "${CALL:-1}" in
1)
  timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_fast_attention.py -k "gpu or interpreter" 2>&1 | tail -8
  timeout 400 python3 benchmarks/bench_dit.py --sizes 720p --steps 1 --out "$OUT" \
    --impls diffusers,hvlab-bf16,hvlab-fa3,hvlab-fp8-fa3,hvlab-fp8-fp8attn 2>&1 | grep -v "^{" | tail -14 ;;
2)
  timeout 240 python3 benchmarks/bench_dit.py --sizes 720p --steps 1 --out "$OUT/call2" \
    --impls hvlab-fp8,hvlab-fp8-int8attn 2>&1 | grep -v "^{" | tail -8
  timeout 330 python3 benchmarks/fp8_attention_error.py --parts dit --size 720p --out "$OUT" \
    --recipes fp8-head,fp8-head+KV,fp8-block+KV,int8qk-block+KV,int8qk-block+K-bf16pv 2>&1 | tail -12 ;;
3)
  timeout 570 python3 benchmarks/fp8_depth_error.py --size 720p --out "$OUT" 2>&1 | tail -12 ;;
4)
  timeout 570 python3 benchmarks/fp8_depth_error.py --size 720p --sweep --variants scaled_mm/channel/token \
    --out "$OUT/sweep" 2>&1 | tail -24 ;;
esac
