#!/usr/bin/env bash
# The two-object toy retrain (#15) on one lent H100/H200, then its evaluation; weights + logs under $OUT.
# One command, repeated once per device call (a call may run 10 minutes): each call resumes the run in
# $RUN from its last checkpoint (a warm machine keeps /tmp between calls; state.pt is too big to carry),
# and the call that finishes the training also evaluates. ~14 minutes of training loops (VAE 4 + DiT 10,
# sized by timing their first steps) plus the latent pool, export and evaluation: about 18 GPU-minutes.
#   bash scripts/gpu/train_toy_two_object.sh        # call 1: VAE + the start of the DiT
#   bash scripts/gpu/train_toy_two_object.sh        # call 2: the rest of the DiT, export, evaluation
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-}:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-outputs/gpu}; mkdir -p "$OUT"
run=${RUN:-/tmp/toy2}
limit=${LIMIT:-560}  # seconds this call may train for (the device call's limit, less the packing)
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
resume=""; [ -f $run/state.pt ] && resume="--resume"
if [ ! -f $run/summary.json ]; then
  timeout $limit python -m hvlab.toy.train --world two-object --init-from hvlab/toy/weights --out $run \
      --vae-minutes 4 --dit-minutes 10 --pool 65536 --save-every 250 $resume 2>&1 | tee -a $run.train.log
fi
if [ ! -f $run/summary.json ]; then
  echo "training stopped at the call's limit after $(( $(date +%s) - start )) s: run this script again to resume"
  cp $run.train.log "$OUT/train.log"
  exit 0
fi
cp $run/weights/dit.safetensors $run/weights/vae.safetensors "$OUT/"   # weights first: a time-out still returns them
tar -C $run -cf "$OUT/misc.tar" weights/text_encoder.safetensors weights/text_encoder_2.safetensors weights/config.json \
    vae_loss.csv dit_loss.csv loss_curves.png summary.json
left=$(( 590 - $(date +%s) + start ))
timeout $left python -m hvlab.toy.evaluate --weights $run/weights --device cuda --world two-object \
    --maps cross concept --out "$OUT/eval_two_object.json" 2>&1 | tee -a $run.train.log
cp $run.train.log "$OUT/train.log"
echo "call wall: $(( $(date +%s) - start )) s"
