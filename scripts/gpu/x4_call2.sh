#!/usr/bin/env bash
# Second call on the same 4-GPU host: the benchmarks again with the reference wheels fixed, and the toy
# training resumed from runs/toy_scratch (x4_call1.sh) to its end, then evaluated.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-outputs/gpu}; L=/tmp/logs2; mkdir -p "$OUT" $L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dif2 .whl/*.whl \
  > $L/pip.log 2>&1 || echo "wheel install failed"
PYTHONPATH=/tmp/dif2 python3 -c "import diffusers, huggingface_hub; from diffusers import HunyuanVideoTransformer3DModel; print('diffusers', diffusers.__version__, 'hub', huggingface_hub.__version__)" > $L/env.txt 2>&1
tail -2 $L/env.txt
R=$PWD; P=$R:/tmp/dif2
(CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$P timeout 540 python3 benchmarks/bench_dit.py --sizes 720p \
   --impls diffusers,hvlab-fp8,hvlab-bf16 --steps 2 --out $L/dit > $L/dit.log 2>&1) &
(CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$P timeout 540 python3 benchmarks/e2e_720p.py --steps 2 --out $L/e2e > $L/e2e.log 2>&1) &
(CUDA_VISIBLE_DEVICES=2 PYTHONPATH=$P timeout 540 python3 benchmarks/bench_vae.py --out $L/vae > $L/vae.log 2>&1) &
(CUDA_VISIBLE_DEVICES=3 RUN=runs/toy_scratch SKIP_CFG7=1 timeout 550 bash scripts/gpu/train_toy.sh 5 8 --save-every 250 --resume \
   > $L/toy.log 2>&1) &
wait
tar czf "$OUT/call2.tgz" -C /tmp logs2
for f in dit.log e2e.log vae.log toy.log; do echo "=== $f"; tail -n 12 $L/$f | cut -c1-400; done
