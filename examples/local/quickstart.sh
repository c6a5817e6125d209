#!/bin/bash
# The CPU quick start: set up, build a tiny corpus with the real tools, pretrain the debug
# flavor on it with Megatron's loop for 40 iterations, save a checkpoint, plot the losses.
# Everything lands in ${WORKDIR:-runs/quickstart}.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
W=${WORKDIR:-runs/quickstart}
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf "$W"
.venv/bin/python -m megatron_ualm.quickstart --workdir "$W"
.venv/bin/torchrun --standalone --nproc-per-node 1 -m megatron_ualm.pretrain \
  --flavor debug --blend-file "$W/blend.json" --data-cache-path "$W/cache" --split 98,1,1 \
  --seq-length 128 --micro-batch-size 4 --global-batch-size 8 --train-iters 40 \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 4 \
  --log-interval 5 --eval-interval 20 --eval-iters 2 \
  --save "$W/ckpt" --save-interval 40 --tensorboard-dir "$W/tb" --loss-plot "$W/loss.png" 2>&1 \
  | grep -E "^ \[UALM\]| iteration +[0-9]+/|validation loss|saved checkpoint|^error|Error:|Traceback" | cut -c1-220
echo "checkpoint: $W/ckpt (iteration $(cat "$W/ckpt/latest_checkpointed_iteration.txt")), loss plot: $W/loss.png"
