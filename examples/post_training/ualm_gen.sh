#!/bin/bash
# UALM-Gen post-training (paper: CFG + DPO): preference pairs from the model's own generations
# (CLAP + AudioBox-Aesthetics) -> the adaptation step (SFT on the winning generations) -> DPO with
# the cross-entropy regulariser on the chosen response.
#
#   bash examples/post_training/ualm_gen.sh                  # CPU: debug flavor, tiny random parts, ~2 min
#   CONFIG=examples/post_training/configs/qwen2.5-7b.sh \
#     sbatch --nodes 2 examples/post_training/ualm_gen.sh    # the same steps on a Slurm allocation
#
# Run from the repository root. Every step resumes when the script is run again (pairs skip
# finished prompts, data tools keep finished shards, training resumes from its --save).
# Environment: CONFIG (flags and paths; default configs/debug_cpu.sh), WORKDIR (default
# runs/post_training/gen), PYTHON, NPROC_PER_NODE (ranks per node, default 1).
#SBATCH --job-name=ualm-gen-post
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"
source examples/post_training/common.sh
W=${WORKDIR:-runs/post_training/gen}
mkdir -p "$W"
demo_setup "$W"

step "1/3 preference pairs from $BASE_CKPT (${PAIR_ARGS[*]}), scored by CLAP and aesthetics"
pairs "$BASE_CKPT" "$PROMPTS" "$W/pairs"

step "2/3 adaptation: SFT on the winning generations"
shards adaptation preprocess_chat "$W/pairs/adaptation.jsonl"
blend "$W/adaptation_blend.json" "$W/shards/adaptation"
train megatron_ualm.finetune "$BASE_CKPT" "$W/adapted" "$W/adaptation_blend.json" "${SFT_ARGS[@]}"

step "3/3 DPO from the adapted model"
dpo dpo "$W/adapted" "$W/pairs"

echo
echo "UALM-Gen post-training done: adapted $W/adapted, DPO $W/dpo (metrics: $W/dpo/metrics.jsonl)"
