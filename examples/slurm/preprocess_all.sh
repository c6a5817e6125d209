#!/bin/bash
# Submits UALM preprocessing to Slurm: one array job per data family (preprocess_<family>.sbatch,
# task I of N writing shards I, I+N, ... into $OUT/<family>/), then build_blend.sbatch with
# --dependency=afterok on all of them. Run it on a login node from the repository root, in the
# environment the jobs should use (sbatch passes it on: activate the virtualenv, or set PYTHON):
#
#   export OUT=/data/ualm TOKENIZER=/models/Qwen2.5-7B-Instruct CODEC_PATH=/models/xcodec-hubert-general
#   TEXT="/data/text/*.jsonl" GENERATION="/data/gen/*.parquet" UNDERSTANDING="/data/af3/*.jsonl" \
#     TASKS=64 bash examples/slurm/preprocess_all.sh
#
# Variables:
#   OUT               shards go to $OUT/<family>/, the blend to $OUT/blend.json, logs to $OUT/logs/
#   TOKENIZER         tokenizer.json, a directory holding one, or a sentencepiece model
#   TEXT, GENERATION, UNDERSTANDING
#                     manifests of each family: paths or globs, space-separated (unset: skipped)
#   CODEC_PATH        X-Codec checkpoint directory (generation)
#   FLAVOR            flavor whose audio encoder sets understanding's features (default qwen2.5-7b)
#   TASKS             array tasks per family (default 16); TEXT_TASKS, GENERATION_TASKS and
#                     UNDERSTANDING_TASKS override it per family
#   TEXT_ARGS, GENERATION_ARGS, UNDERSTANDING_ARGS, BLEND_ARGS
#                     more flags for that tool, e.g. GENERATION_ARGS="--records-per-shard 500"
#   SBATCH            more sbatch flags for every job, e.g. "--account=audio --partition=cpu"
#   TEXT_SBATCH, GENERATION_SBATCH, UNDERSTANDING_SBATCH, BLEND_SBATCH
#                     more sbatch flags for that job, e.g. GENERATION_SBATCH="--partition=gpu"
#
# Prints one line per job. A failed or cancelled task is rerun alone with
# `bash $OUT/logs/resubmit_<family>.sh I` (the same command with --array=I; its finished shards
# are kept); the blend job is then cancelled by Slurm (its dependency can no longer be met) and
# is submitted again with `bash $OUT/logs/resubmit_blend.sh [JOB_ID...]` (after those jobs).
set -euo pipefail
: "${OUT:?set OUT to the output directory}" "${TOKENIZER:?set TOKENIZER to the tokenizer}"
if [ -z "${TEXT:-}${GENERATION:-}${UNDERSTANDING:-}" ]; then
  echo "preprocess_all: set at least one of TEXT, GENERATION, UNDERSTANDING to manifest paths or globs" >&2
  exit 2
fi
if [ -n "${GENERATION:-}" ] && [ -z "${CODEC_PATH:-}" ]; then
  echo "preprocess_all: GENERATION needs CODEC_PATH (the X-Codec checkpoint directory)" >&2
  exit 2
fi
for path in "$TOKENIZER" ${GENERATION:+"$CODEC_PATH"}; do
  [ -e "$path" ] || { echo "preprocess_all: $path does not exist (TOKENIZER / CODEC_PATH)" >&2; exit 2; }
done
HERE=examples/slurm
[ -f "$HERE/build_blend.sbatch" ] || { echo "preprocess_all: run it from the repository root" >&2; exit 2; }
OUT=$(realpath -m "$OUT")
mkdir -p "$OUT/logs"
job_ids=()
family_outputs=()

# Writes $OUT/logs/resubmit_<name>.sh: the exact sbatch command of a submission, with the
# shell text INSERT (which reads the script's arguments) placed after its first HEAD words.
write_resubmit() {  # name, comment, head, insert, command...
  local name=$1 comment=$2 head=$3 insert=$4; shift 4
  { echo '#!/bin/bash'; echo "# $comment"; echo 'set -euo pipefail'; echo "cd $(printf '%q' "$PWD")"
    printf '%q ' "${@:1:head}"; echo -n "$insert "; printf '%q ' "${@:head+1}"; echo; } > "$OUT/logs/resubmit_$name.sh"
}

submit_family() {  # family, manifests, the tool's family-specific flags...
  local family=$1 manifests=$2; shift 2
  [ -n "$manifests" ] || return 0
  local upper=${family^^}
  local tasks_var=${upper}_TASKS args_var=${upper}_ARGS sbatch_var=${upper}_SBATCH
  local n=${!tasks_var:-${TASKS:-16}} files=() f
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "preprocess_all: $family tasks must be a positive integer, not '$n'" >&2; exit 2; }
  # Globs expand here, on the login node; a pattern that matches nothing stops the submission.
  # shellcheck disable=SC2206
  local patterns=($manifests)
  for f in "${patterns[@]}"; do
    if [ -e "$f" ]; then files+=("$(realpath "$f")")
    else echo "preprocess_all: $family manifest $f does not exist" >&2; exit 2; fi
  done
  # shellcheck disable=SC2206
  local cmd=(sbatch --parsable ${SBATCH:-} ${!sbatch_var:-} "--output=$OUT/logs/%x-%A_%a.out"
             "$HERE/preprocess_$family.sbatch" --num-tasks "$n" --input "${files[@]}" --output "$OUT/$family"
             --tokenizer "$TOKENIZER" "$@" ${!args_var:-})
  # shellcheck disable=SC2016  # the resubmit script expands its own arguments
  write_resubmit "$family" "Reruns tasks of the $family array alone: bash $OUT/logs/resubmit_$family.sh I[,J...]" \
    2 '--array="${1:?give the task index(es) to rerun, e.g. 3 or 3,7}"' "${cmd[@]}"
  local id
  id=$("${cmd[@]:0:2}" "--array=0-$((n - 1))" "${cmd[@]:2}")
  id=${id%%;*}
  job_ids+=("$id")
  family_outputs+=("$OUT/$family")
  echo "$family: job $id, array 0-$((n - 1)) -> $OUT/$family (rerun task I: bash $OUT/logs/resubmit_$family.sh I)"
}

submit_family text "${TEXT:-}"
submit_family generation "${GENERATION:-}" --codec-path "${CODEC_PATH:-}"
submit_family understanding "${UNDERSTANDING:-}" --flavor "${FLAVOR:-qwen2.5-7b}"

# shellcheck disable=SC2206
blend=(sbatch --parsable ${SBATCH:-} ${BLEND_SBATCH:-} "--output=$OUT/logs/%x-%j.out" --kill-on-invalid-dep=yes)
# shellcheck disable=SC2206
blend_args=("$HERE/build_blend.sbatch" "${family_outputs[@]}" --output "$OUT/blend.json" ${BLEND_ARGS:-})
# shellcheck disable=SC2016  # the resubmit script expands its own arguments
write_resubmit blend "Submits the blend job again, after the jobs given: bash $OUT/logs/resubmit_blend.sh [JOB_ID...]" \
  "${#blend[@]}" '${1:+--dependency=afterok:$(IFS=:; echo "$*")}' "${blend[@]}" "${blend_args[@]}"
deps=$(IFS=:; echo "${job_ids[*]}")
id=$("${blend[@]}" "--dependency=afterok:$deps" "${blend_args[@]}")
echo "blend: job ${id%%;*}, after ${deps//:/ } -> $OUT/blend.json (again: bash $OUT/logs/resubmit_blend.sh [JOB_ID...])"
