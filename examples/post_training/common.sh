# shellcheck shell=bash
# Sourced by the post-training recipes (ualm_gen.sh, ualm_reason.sh): how each step is launched,
# the CPU demo's setup, and the config. Not a program of its own.
#
# Three launchers, so the same recipe runs on one machine and on a Slurm allocation:
#   launch MODULE ARGS...  python -m MODULE on every rank. Outside Slurm: torchrun with
#                          NPROC_PER_NODE ranks here. Inside an allocation (sbatch, salloc):
#                          examples/slurm/launch.sh's ualm_train (training entry points: the
#                          timeouts, FAULT_TOLERANCE=1) or ualm_launch (the other tools), as
#                          pretrain.sbatch launches pretraining (one srun task per node,
#                          rendezvous on the first node), a fresh rendezvous port per step.
#   tasks TOOL ARGS...     a data tool split over the allocation's nodes (one srun task per node;
#                          each takes its share of the shards from SLURM_NTASKS / SLURM_PROCID),
#                          or one process here.
#   single TOOL ARGS...    one process (srun --ntasks 1 inside an allocation).
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} NPROC_PER_NODE=${NPROC_PER_NODE:-1}
CONFIG=${CONFIG:-examples/post_training/configs/debug_cpu.sh}
[ -f "$CONFIG" ] || { echo "post-training recipe: no config $CONFIG in $PWD (run from the repository root, or set CONFIG)" >&2; exit 2; }
# shellcheck source=/dev/null
source "$CONFIG"
_PORT=$((20000 + ${SLURM_JOB_ID:-$$} % 20000))

# Each step is a new process; without Transformer Engine / Apex (the CPU demo) the first one says
# so (megatron_ualm/compat/quiet.py), and the variable keeps the later ones from repeating it.
step() {
  echo; echo "== $* ($(date +%T))"
  if [ -n "${_UALM_STEPPED:-}" ]; then export UALM_FALLBACK_NOTICE_SHOWN=1; fi
  _UALM_STEPPED=1
}

# shellcheck source=examples/slurm/launch.sh
source examples/slurm/launch.sh

launch() {
  local module=$1; shift
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    _PORT=$((_PORT + 1))  # a fresh rendezvous per step
    local MASTER_PORT=$_PORT SRUN_ARGS=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES")
    case $module in
      megatron_ualm.pretrain|megatron_ualm.finetune|megatron_ualm.dpo) ualm_train "$module" "$@" ;;
      *) ualm_launch "$module" "$@" ;;  # the pair and reflection builders take no Megatron flags
    esac
  else
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE" -m "$module" "$@"
  fi
}

tasks() {
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES" \
      "$PYTHON" "$@"
  else
    "$PYTHON" "$@"
  fi
}

single() {
  if [ -n "${SLURM_JOB_ID:-}" ]; then srun --nodes=1 --ntasks=1 "$PYTHON" "$@"; else "$PYTHON" "$@"; fi
}

# The CPU demo's inputs when the config names none: tiny random tokenizer / codec / scorers /
# critic, prompts and Reason records (megatron_ualm.posttraining.recipes), and a starting
# checkpoint pretrained from the quick-start corpus. Sets the variables the recipes read.
demo_setup() {
  local w=$1
  if [ -n "${BASE_CKPT:-}" ]; then return; fi
  step "setup: tiny components and inputs (megatron_ualm.posttraining.recipes)"
  [ -f "$w/setup/paths.sh" ] || single -m megatron_ualm.posttraining.recipes --workdir "$w/setup" \
    --num-prompts "${NUM_PROMPTS:-8}"
  # shellcheck source=/dev/null
  source "$w/setup/paths.sh"
  step "setup: the starting checkpoint (megatron_ualm.pretrain on the quick-start corpus)"
  launch megatron_ualm.pretrain "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" "${PRETRAIN_ARGS[@]}" \
    --blend-file "$PRETRAIN_BLEND" --data-cache-path "$w/cache" --load "$w/base" --save "$w/base"
  BASE_CKPT=$w/base
}

# shards NAME TOOL MANIFEST...: a data tool's shards of the manifests under $W/shards/NAME, and their blend.
shards() {
  local name=$1 tool=$2; shift 2
  tasks "tools/$tool.py" --input "$@" --output "$W/shards/$name" --tokenizer "$TOKENIZER" --codec-path "$CODEC" \
    "${DATA_TOOL_ARGS[@]}"
}

# blend OUT SHARD_DIR...: the training blend of shard outputs.
blend() {
  local out=$1; shift
  single tools/build_blend.py "$@" --output "$out"
}

# pairs CKPT PROMPTS OUT: preference pairs (and the adaptation manifest) from CKPT's generations.
pairs() {
  launch megatron_ualm.posttraining.pairs --load "$1" --tokenizer "$TOKENIZER" --codec "$CODEC" --prompts "$2" \
    --out "$3" --scorer clap="$CLAP" --scorer aesthetics="$AES" "${GEN_ARGS[@]}" "${PAIR_ARGS[@]}"
}

# dpo NAME CKPT PAIRS_DIR: DPO from CKPT into $W/NAME on PAIRS_DIR/pairs.jsonl (shards in $W/shards/NAME).
dpo() {
  shards "$1" preprocess_preferences "$3/pairs.jsonl"
  blend "$W/$1_blend.json" "$W/shards/$1"
  train megatron_ualm.dpo "$2" "$W/$1" "$W/$1_blend.json" "${DPO_ARGS[@]}"
}

# train MODULE CKPT OUT BLEND FLAGS...: a training entry point (megatron_ualm.finetune / .dpo) that
# starts from CKPT and keeps its own run in OUT (--load and --save: a rerun resumes), on BLEND.
# Metrics go to OUT/tb (TensorBoard), OUT/metrics.jsonl and OUT/loss.png (tools/plot_losses.py).
train() {
  local module=$1 ckpt=$2 out=$3 blend=$4; shift 4
  launch "$module" "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" "$@" \
    --pretrained-checkpoint "$ckpt" --load "$out" --save "$out" --blend-file "$blend" --data-cache-path "$W/cache" \
    --tensorboard-dir "$out/tb" --loss-plot "$out/loss.png"
}
