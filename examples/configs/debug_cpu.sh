# A CPU-only smoke run: the debug flavor on synthetic data, float32, a checkpoint every
# 3 iterations. Sourced by examples/slurm/pretrain.sbatch (tests/slurm submits it this way); on a
# machine without CUDA the entry point itself switches to gloo and the CPU shims. TP and PP
# (default 1) set the model-parallel sizes; the world size is NPROC_PER_NODE x tasks.
# shellcheck shell=bash disable=SC2034  # the arrays are read by the script that sources this
export TORCHDYNAMO_DISABLE=1
MODEL_ARGS=(--flavor debug --seq-length 64)
PARALLEL_ARGS=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
PRECISION_ARGS=()
DATA_ARGS=(--synthetic-data)
TRAIN_ARGS=(--micro-batch-size 2 --global-batch-size 4 --train-iters 12 --lr 1e-3 --seed 1234)
CKPT_ARGS=(--load "${CKPT_DIR:-runs/debug_cpu/ckpt}" --save "${CKPT_DIR:-runs/debug_cpu/ckpt}" --save-interval 3)
LOG_ARGS=(--log-interval 1 --eval-iters 0)
