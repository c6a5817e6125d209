# shellcheck shell=bash
# Post-training recipes on CPU: the debug flavor, tiny random components, a few steps per stage
# (a few minutes in all). Sourced by examples/post_training/common.sh. No paths here: the recipe
# builds its inputs and starting checkpoint (BASE_CKPT unset). Sizes can be overridden from the
# environment (tests/posttraining/test_recipes.py does).
MODEL_ARGS=(--flavor debug)
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1)
PRECISION_ARGS=()
COMMON_TRAIN=(--log-interval 1 --eval-iters 0 --split 100,0,0 --seed 1234 --lr-decay-style constant)
PRETRAIN_ARGS=(--seq-length 128 --micro-batch-size 4 --global-batch-size 8 --train-iters "${PRETRAIN_ITERS:-20}"
               --lr 3e-3 --save-interval "${PRETRAIN_ITERS:-20}" "${COMMON_TRAIN[@]}")
SFT_ARGS=(--seq-length "${SEQ_LENGTH:-256}" --micro-batch-size 2 --global-batch-size 4 --train-iters "${SFT_ITERS:-6}"
          --lr 1e-3 --save-interval 3 --cfg-condition-dropout 0.05 "${COMMON_TRAIN[@]}")
DPO_ARGS=(--seq-length "${SEQ_LENGTH:-256}" --micro-batch-size 2 --global-batch-size 4 --train-iters "${DPO_ITERS:-6}"
          --lr 1e-4 --beta 0.1 --sft-loss-weight 1.0 --save-interval 3 "${COMMON_TRAIN[@]}")
# The generation tools (pairs, reflection data): model parallelism, precision, decoding.
GEN_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --batch-size 4 --no-progress
          --max-audio-seconds 0.4 --min-audio-seconds 0.2 --max-new-tokens 12 --text-temperature 1.0)
PAIR_ARGS=(--num-candidates "${NUM_CANDIDATES:-4}")
CRITIC_ARGS=(--critic-max-new-tokens 8 --no-progress)
DATA_TOOL_ARGS=(--flavor debug --no-progress)
