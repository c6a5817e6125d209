#!/bin/bash
# UALM-Reason post-training (paper: two rounds of SFT + DPO):
#   SFT-1 on the Reason data (enrichment, dialogue) -> preference pairs (audio after the plan,
#   ranked by how well it matches the rich caption: CLAP with the plan as text, + aesthetics)
#   -> DPO-1 -> self-reflection data from the DPO-1 model (audio 1, its own caption, a critic's
#   critique, audio 2) -> SFT-2 on it merged with round 1 -> pairs again -> DPO-2.
#
#   bash examples/post_training/ualm_reason.sh                  # CPU: debug flavor, tiny random parts
#   CONFIG=examples/post_training/configs/qwen2.5-7b.sh \
#     sbatch --nodes 2 examples/post_training/ualm_reason.sh    # the same steps on a Slurm allocation
#
# Run from the repository root; rerunning resumes every step. Environment: CONFIG, WORKDIR
# (default runs/post_training/reason), PYTHON, NPROC_PER_NODE, SEQ_LENGTH (default 512: a
# self-reflection sample holds two instructions, a plan, two clips, a caption and a critique).
#SBATCH --job-name=ualm-reason-post
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"
export SEQ_LENGTH=${SEQ_LENGTH:-512}
source examples/post_training/common.sh
W=${WORKDIR:-runs/post_training/reason}
mkdir -p "$W"
demo_setup "$W"

# pairs_then_dpo N CKPT: preference pairs from CKPT over the Reason prompts, then DPO from CKPT into $W/dpoN.
pairs_then_dpo() {
  local n=$1 ckpt=$2
  step "pairs $n: candidates after the plan from $ckpt, ranked by CLAP against the plan and aesthetics"
  pairs "$ckpt" "$REASON_PROMPTS" "$W/pairs$n"
  step "DPO-$n from $ckpt"
  dpo "dpo$n" "$ckpt" "$W/pairs$n"
}

step "SFT-1 on the UALM-Reason data (enrichment, dialogue)"
shards reason preprocess_chat "$REASON"
blend "$W/sft1_blend.json" "$W/shards/reason"
train megatron_ualm.finetune "$BASE_CKPT" "$W/sft1" "$W/sft1_blend.json" "${SFT_ARGS[@]}"

pairs_then_dpo 1 "$W/sft1"

step "self-reflection data from DPO-1: audio 1 and its caption by the model's own understanding path"
REFLECT=(--input "$PLANS" --out "$W/reflection")
launch megatron_ualm.posttraining.reflection "${REFLECT[@]}" --load "$W/dpo1" --tokenizer "$TOKENIZER" \
  --codec "$CODEC" "${GEN_ARGS[@]}"
step "self-reflection data: the critic (${CRITIC:-a JSONL by an outside tool})"
if [ -n "${CRITIC:-}" ]; then
  single -m megatron_ualm.posttraining.reflection "${REFLECT[@]}" --critic-model "$CRITIC" "${CRITIC_ARGS[@]}"
  CRITIC_SOURCE=()
else  # critiques by an outside tool, e.g. $W/reflection/critic_requests.jsonl with "critique" filled in
  CRITIC_SOURCE=(--critic-file "${CRITIC_FILE:?set CRITIC (a local causal LM) or CRITIC_FILE (critiques by an outside tool, JSONL)}")
fi
step "self-reflection data: audio 2 (target clip, or a second generation after the critique) and the records"
launch megatron_ualm.posttraining.reflection "${REFLECT[@]}" "${CRITIC_SOURCE[@]}" --load "$W/dpo1" \
  --tokenizer "$TOKENIZER" --codec "$CODEC" "${GEN_ARGS[@]}"

step "SFT-2 from DPO-1 on the self-reflection records merged with round 1"
shards reflection preprocess_chat "$W/reflection/self_reflection.jsonl"
blend "$W/sft2_blend.json" "$W/shards/reflection" "$W/shards/reason"
train megatron_ualm.finetune "$W/dpo1" "$W/sft2" "$W/sft2_blend.json" "${SFT_ARGS[@]}"

pairs_then_dpo 2 "$W/sft2"

echo
echo "UALM-Reason post-training done: $W/sft1 -> $W/dpo1 -> $W/sft2 -> $W/dpo2 (metrics: $W/dpo2/metrics.jsonl)"
