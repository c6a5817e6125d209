# Modality alignment stage on one 8xH100 node: the backbone (converted from
# Qwen2.5-1.5B-Instruct with tools/convert_checkpoint.py) stays frozen; only the adapter, the
# codebook embeddings and the RVQ heads train.
MODEL_ARGS=(--flavor qwen2.5-1.5b --seq-length 4096 --audio-encoder-path "${ENCODER_DIR:-/models/af-whisper}")
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --use-distributed-optimizer)
PRECISION_ARGS=(--bf16)
DATA_ARGS=(--blend-file "${BLEND_FILE:-/data/ualm/blend.json}" --data-cache-path "${DATA_CACHE:-/data/ualm/cache}"
           --split 99,1,0 --num-workers 4)
TRAIN_ARGS=(--micro-batch-size 2 --global-batch-size 256 --train-iters 20000
            --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 500 --clip-grad 1.0
            --freeze alignment)
# No --finetune: Megatron starts from --pretrained-checkpoint (weights only, iteration 0) while
# --load holds no checkpoint yet, and resumes --load after that, so a requeued job continues
# (with --finetune every restart would go back to iteration 0).
CKPT_ARGS=(--pretrained-checkpoint "${INIT_CKPT:-/ckpt/ualm-1.5b-init}"
           --load "${CKPT_DIR:-/ckpt/ualm-1.5b-align}" --save "${CKPT_DIR:-/ckpt/ualm-1.5b-align}" --save-interval 1000
           --exit-signal-handler)
LOG_ARGS=(--log-interval 10 --eval-interval 1000 --eval-iters 20 --tensorboard-dir "${TB_DIR:-/ckpt/ualm-1.5b-align/tb}")
