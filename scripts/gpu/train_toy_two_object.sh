#!/usr/bin/env bash
# The two-object toy retrain (#15) on one lent H100/H200, then its evaluation; weights + logs under $OUT.
# One command, repeated once per device call (a call may run 10 minutes): each call resumes the run in
# $RUN from its last checkpoint (a warm machine keeps /tmp between calls; state.pt is too big to carry),
# and the call that finishes the training also evaluates. Measured on an H200 (2026-12-02, the shipped
# weights): 555.6 s + 530.7 s of calls, of which VAE 243 s and DiT 415 s of training loop (the minutes are
# sized from the first 100 steps, which run slower than the rest).
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
  # PHASES overrides the phase sizes: the shipped run used the default; a DiT-only continuation from the
  # shipped weights: PHASES="--vae-steps 0 --dit-steps 7000" (the model card's "Training further")
  timeout $limit python -m hvlab.toy.train --world two-object --init-from hvlab/toy/weights --out $run \
      ${PHASES:---vae-minutes 4 --dit-minutes 10} --pool 65536 --save-every 250 $resume 2>&1 | tee -a $run.train.log
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
