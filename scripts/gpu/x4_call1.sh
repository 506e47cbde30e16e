#!/usr/bin/env bash
# One call on a 4-GPU host (device tool): the single-GPU benchmarks side by side, one GPU each, and the
# first part of a from-scratch toy training (resumed by train_toy.sh in a later call on the same machine).
#   GPU 0: benchmarks/bench_dit.py   720p + 544p, hvlab bf16 / FP8 and diffusers, same process
#   GPU 1: benchmarks/e2e_720p.py    the whole pipeline at 720p x 129 frames, free and under a 24 GiB cap
#   GPU 2: benchmarks/bench_vae.py   tiled decode at 720p x 129 frames, hvlab tile settings and diffusers
#   GPU 3: python -m hvlab.toy.train from scratch into runs/toy_scratch (killed at the call's end, resumable)
# diffusers (and the huggingface_hub it needs) come as wheels in .whl, on the path of the two benchmarks
# that compare against it only: the text-encoder benchmark keeps the machine's own transformers stack.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-outputs/gpu}; L=/tmp/logs; mkdir -p "$OUT" $L
TOY_ARGS=${TOY_ARGS:---vae-minutes 5 --dit-minutes 8 --save-every 250}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dif .whl/*.whl \
  > $L/pip.log 2>&1 || echo "wheel install failed (diffusers rows will say so)"
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  PYTHONPATH=/tmp/dif python3 -c "import diffusers; from diffusers import HunyuanVideoTransformer3DModel; print('diffusers', diffusers.__version__)"
} > $L/env.txt 2>&1
cat $L/env.txt
R=$PWD
(cd $R && CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$R:/tmp/dif timeout 560 python3 benchmarks/bench_dit.py --sizes 720p,544p \
   --steps 2 --out $L/dit > $L/dit.log 2>&1) &
(cd $R && CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$R timeout 560 python3 benchmarks/e2e_720p.py --steps 2 --out $L/e2e \
   > $L/e2e.log 2>&1) &
(cd $R && CUDA_VISIBLE_DEVICES=2 PYTHONPATH=$R:/tmp/dif timeout 560 python3 benchmarks/bench_vae.py --out $L/vae \
   > $L/vae.log 2>&1) &
(cd $R && CUDA_VISIBLE_DEVICES=3 PYTHONPATH=$R timeout 555 python3 -m hvlab.toy.train --out runs/toy_scratch $TOY_ARGS \
   > $L/toy.log 2>&1) &
wait
cp runs/toy_scratch/*.csv $L/ 2>/dev/null
tar czf "$OUT/call1.tgz" -C /tmp logs
for f in dit.log e2e.log vae.log toy.log; do echo "=== $f"; tail -n 14 $L/$f; done
