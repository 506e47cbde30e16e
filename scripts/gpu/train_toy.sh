#!/usr/bin/env bash
# Run on the lent GPU (device tool): train the toy model, evaluate it, return weights + logs under $OUT.
# Usage: bash scripts/gpu/train_toy.sh VAE_MINUTES DIT_MINUTES [extra hvlab.toy.train flags]
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-}:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-outputs/gpu}; mkdir -p "$OUT"
run=${RUN:-/tmp/toy}
vm=$1; dm=$2; shift 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
python -m hvlab.toy.train --out $run --vae-minutes $vm --dit-minutes $dm "$@" 2>&1 | tee $run.train.log
echo "train wall: $(( $(date +%s) - start )) s" | tee -a $run.train.log
cp $run/weights/dit.safetensors $run/weights/vae.safetensors "$OUT/"   # weights first: a time-out still returns them
tar -C $run -cf "$OUT/misc0.tar" weights/text_encoder.safetensors weights/text_encoder_2.safetensors weights/config.json \
    vae_loss.csv dit_loss.csv summary.json
python -m hvlab.toy.evaluate --weights $run/weights --device cuda --out $run/eval_default.json 2>&1 | tee -a $run.train.log
tar -C $run -cf "$OUT/misc.tar" weights/text_encoder.safetensors weights/text_encoder_2.safetensors weights/config.json \
    vae_loss.csv dit_loss.csv loss_curves.png summary.json eval_default.json
cp $run.train.log "$OUT/train.log"; rm -f "$OUT/misc0.tar"
el=$(( $(date +%s) - start )); echo "elapsed $el s"
if [ $el -lt 500 ] && [ -z "${SKIP_CFG7:-}" ]; then
  timeout $(( 560 - el )) python -m hvlab.toy.evaluate --weights $run/weights --device cuda --cfg 7.0 --out $OUT/eval_cfg7.json 2>&1 | tail -4
fi
echo "total wall: $(( $(date +%s) - start )) s"
