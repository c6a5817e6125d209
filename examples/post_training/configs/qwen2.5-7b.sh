# shellcheck shell=bash
# Post-training recipes for the 7B model on 8-GPU nodes (sourced by examples/post_training/common.sh).
# Edit the paths (or set them in the environment), then from the repository root:
#   CONFIG=examples/post_training/configs/qwen2.5-7b.sh sbatch --nodes 4 examples/post_training/ualm_gen.sh
#   CONFIG=examples/post_training/configs/qwen2.5-7b.sh sbatch --nodes 4 examples/post_training/ualm_reason.sh
# Each step runs on every GPU of the allocation: training with TP=4 (+SP, distributed optimizer);
# generation (pairs, reflection data) with TP=2, so 4 data-parallel replicas per node share the prompts.
# Rates follow the paper where it gives them (DPO: beta 0.1, lr about 2e-7, the cross-entropy
# regulariser; adaptation: about 1k steps of plain cross-entropy; CFG w = 3, top-k 20, T = 0.8).
BASE_CKPT=${BASE_CKPT:-/ckpt/ualm-7b}                     # pretrained or converted checkpoint (its --save root)
TOKENIZER=${TOKENIZER:-/models/Qwen2.5-7B-Instruct}      # the tokenizer the checkpoint was trained with
CODEC=${CODEC:-/models/xcodec}                           # X-Codec, save_pretrained layout
CLAP=${CLAP:-/models/clap-htsat-fused}                   # LAION-CLAP, transformers layout
AES=${AES:-/models/audiobox-aesthetics/checkpoint.pt}    # AudioBox-Aesthetics checkpoint
PROMPTS=${PROMPTS:-/data/post/tta_prompts.jsonl}         # UALM-Gen: {"id", "prompt"} per line
REASON=${REASON:-/data/post/reason_sft.jsonl}            # UALM-Reason round 1: enrichment / dialogue records
REASON_PROMPTS=${REASON_PROMPTS:-/data/post/reason_dpo.jsonl}  # Reason records whose plan prompts the DPO pairs
PLANS=${PLANS:-/data/post/reflection_plans.jsonl}        # {"id", "prompt", "rich_caption", "audio"?} for round 2
CRITIC=${CRITIC-/models/Qwen2.5-7B-Instruct}             # text LLM critic; CRITIC= with CRITIC_FILE=... for an outside one
export NPROC_PER_NODE=${NPROC_PER_NODE:-8} OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} CUDA_DEVICE_MAX_CONNECTIONS=1

MODEL_ARGS=(--flavor qwen2.5-7b)
PARALLEL_ARGS=(--tensor-model-parallel-size 4 --sequence-parallel --use-distributed-optimizer
               --overlap-grad-reduce --overlap-param-gather)
PRECISION_ARGS=(--bf16)
COMMON_TRAIN=(--log-interval 10 --eval-iters 0 --split 100,0,0 --num-workers 4 --seed 1234
              --exit-signal-handler --ckpt-format torch_dist --async-save)
SFT_ARGS=(--seq-length "${SEQ_LENGTH:-4096}" --micro-batch-size 1 --global-batch-size 128 --train-iters 1000
          --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --lr-warmup-iters 50 --weight-decay 0.1 --clip-grad 1.0
          --cfg-condition-dropout 0.05 --save-interval 200 "${COMMON_TRAIN[@]}")
DPO_ARGS=(--seq-length "${SEQ_LENGTH:-4096}" --micro-batch-size 2 --global-batch-size 64 --train-iters 1000
          --lr 2e-7 --lr-decay-style constant --beta 0.1 --sft-loss-weight 1.0 --save-interval 100 "${COMMON_TRAIN[@]}")
GEN_ARGS=(--tensor-model-parallel-size 2 --bf16 --batch-size 4 --no-progress --max-audio-seconds 10
          --min-audio-seconds 1)
PAIR_ARGS=(--num-candidates 8)
CRITIC_ARGS=(--critic-batch-size 32 --no-progress)
DATA_TOOL_ARGS=(--flavor qwen2.5-7b --workers 16 --no-progress)
