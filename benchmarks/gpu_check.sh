#!/bin/bash
# One-shot GPU check for a lent H100/H200 (see benchmarks/RESULTS.md for what it produced).
# Assumes Megatron-Core + Transformer Engine on PYTHONPATH (../shared/device/te_kit.sh install).
# Prepare the kit WITHOUT EXTRA_WHEELS="soundfile soxr": the device image has no cffi, and a
# carried soundfile makes `import transformers` fail (transformers.audio_utils imports it).
# Usage: bash benchmarks/gpu_check.sh [train|generation|all]   (default: all)
# The step limits add up to about 12 minutes, more than one 10-minute device call: run
# `train` and `generation` as two calls on the same warm machine. TE install took ~130 s on an
# H200 (2026-11-27); the steps themselves have not yet run end to end on a GPU.
# Writes every log under ${OUT:-/tmp/gpu_check}; each step has its own time limit so one
# failure does not eat the budget of the others.
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? for $name"; grep -E "UALM step|GPTModel|ratio|Error|error:" "$OUT/$name.log" | head -20
}

if [ "$PART" = train ] || [ "$PART" = all ]; then
# Issue 2 target: UALM vs plain GPTModel step time at Qwen2.5-7B shapes (8 layers), seq 4096, TE.
step model_step_bf16 110 python benchmarks/model_step.py --flavor qwen2.5-7b --num-layers 8 \
  --seq-length 4096 --bf16 --steps 8 --warmup 3 --json "$OUT/model_step_bf16.json"

# Issue 4: the entry point on one GPU, Qwen2.5-1.5B shapes, TE, BF16 then FP8.
for prec in bf16 fp8; do
  extra=""; [ "$prec" = fp8 ] && extra="--fp8-format hybrid --fp8-recipe delayed"
  step "pretrain_1.5b_$prec" 140 torchrun --standalone --nproc-per-node 1 -m megatron_ualm.pretrain --flavor qwen2.5-1.5b --synthetic-data \
    --bf16 $extra --seq-length 4096 --micro-batch-size 2 --global-batch-size 8 --train-iters ${ITERS:-40} \
    --lr 1e-4 --log-interval 10 --eval-iters 0 --num-workers 2 --use-distributed-optimizer
  grep -E " iteration +[0-9]+/|\[UALM\]|max allocated" "$OUT/pretrain_1.5b_$prec.log" | tail -4 | cut -c1-400
done
step model_step_fp8 110 python benchmarks/model_step.py --flavor qwen2.5-7b --num-layers 8 \
  --seq-length 4096 --bf16 --fp8 hybrid --steps 8 --warmup 8 --gpt-first --families text,generation \
  --json "$OUT/model_step_fp8.json"
fi

if [ "$PART" = generation ] || [ "$PART" = all ]; then
# Issue 6: generation, Qwen2.5-1.5B shapes, BF16, batch 16 with CFG (32 rows), 10 s of audio.
# Megatron's StaticInferenceContext (eager) against the decode step replayed from a CUDA graph
# (inference/static_cache.py; the run first checks that the graph decodes what eager decodes).
for mode in megatron cuda-graphs; do
  extra=""; [ "$mode" = cuda-graphs ] && extra="--cuda-graphs"
  step "generation_1.5b_$mode" 120 python benchmarks/generation.py --flavor qwen2.5-1.5b --bf16 \
    --transformer-impl local --audio-seconds 10 --text-tokens 64 --batch-sizes 16 --repeats 1 $extra \
    --json "$OUT/generation_1.5b_$mode.json"
  grep -E "CUDA-graph check|\| audio|\| text" "$OUT/generation_1.5b_$mode.log"
done
fi
