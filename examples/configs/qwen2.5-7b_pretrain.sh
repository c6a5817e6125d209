# Flags for 7B UALM pretraining (sourced by the Slurm scripts). Edit paths and sizes here.
# The flavor supplies the backbone flags (layers, widths, RMSNorm, SwiGLU, QKV bias, RoPE 1e6).
MODEL_ARGS=(--flavor qwen2.5-7b --seq-length 4096 --max-position-embeddings 32768)
PARALLEL_ARGS=(--tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 --sequence-parallel
               --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
PRECISION_ARGS=(--bf16 --fp8-format hybrid --fp8-recipe delayed --fp8-amax-history-len 1024
                --fp8-amax-compute-algo max)
DATA_ARGS=(--blend-file "${BLEND_FILE:-/data/ualm/blend.json}" --data-cache-path "${DATA_CACHE:-/data/ualm/cache}"
           --split 99,1,0 --num-workers 4)
TRAIN_ARGS=(--micro-batch-size 1 --global-batch-size 512 --train-iters 200000
            --lr 2e-5 --min-lr 2e-6 --lr-decay-style cosine --lr-warmup-iters 2000
            --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0
            --cfg-condition-dropout 0.05 --freeze full)
CKPT_ARGS=(--load "${CKPT_DIR:-/ckpt/ualm-7b}" --save "${CKPT_DIR:-/ckpt/ualm-7b}" --save-interval 1000
           --exit-signal-handler
           --ckpt-format torch_dist --async-save)
LOG_ARGS=(--log-interval 10 --eval-interval 2000 --eval-iters 20
          --tensorboard-dir "${TB_DIR:-/ckpt/ualm-7b/tb}" --log-timers-to-tensorboard)
