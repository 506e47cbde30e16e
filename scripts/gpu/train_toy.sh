#!/usr/bin/env bash
# Run on the lent GPU (device tool): train the toy model, evaluate it, return weights + logs under $OUT.
# Usage: bash scripts/gpu/train_toy.sh VAE_MINUTES DIT_MINUTES
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-outputs/gpu}; mkdir -p "$OUT"
run=/tmp/toy
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/../gpu.txt" 2>/dev/null
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
python -m hvlab.toy.train --out $run --vae-minutes ${1:-2.5} --dit-minutes ${2:-4.5} 2>&1 | tee $run.train.log
echo "train wall: $(( $(date +%s) - start )) s" | tee -a $run.train.log
for cfg in 4.0; do
  python -m hvlab.toy.evaluate --weights $run/weights --device cuda --out $run/eval_cfg$cfg.json --cfg $cfg 2>&1 | tee -a $run.train.log
done
python -m hvlab.toy.evaluate --weights $run/weights --device cuda --out $run/eval_shift3.json --shift 3.0 2>&1 | tee -a $run.train.log
python -m hvlab.toy.evaluate --weights $run/weights --device cuda --out $run/eval_cfg6.json --cfg 6.0 2>&1 | tee -a $run.train.log
cp $run/weights/dit.safetensors $run/weights/vae.safetensors "$OUT/"
tar -C $run -cf "$OUT/misc.tar" weights/text_encoder.safetensors weights/text_encoder_2.safetensors weights/config.json \
    vae_loss.csv dit_loss.csv loss_curves.png summary.json eval_cfg4.0.json eval_shift3.json eval_cfg6.json
cp $run.train.log "$OUT/train.log"
echo "total wall: $(( $(date +%s) - start )) s"
