# shellcheck shell=bash
# How UALM training starts on a Slurm allocation, one node or many. Sourced (not run) by
# examples/slurm/pretrain.sbatch, examples/slurm/posttrain.sbatch and
# examples/post_training/common.sh; they call
#
#   ualm_train MODULE ARGS...    # a Megatron training entry point (megatron_ualm.pretrain,
#                                # .finetune, .dpo) on every rank: the collective timeouts
#                                # below, and fault tolerance with FAULT_TOLERANCE=1
#   ualm_launch MODULE ARGS...   # any other torch.distributed program (the pair and reflection
#                                # builders): python -m MODULE ARGS... on every rank, torchrun
#
# One srun task per node (the allocation's tasks; SRUN_ARGS adds srun flags), each a launcher
# "node" for NPROC_PER_NODE ranks. The ranks rendezvous (c10d) on the first node of the
# allocation, by its host name: MASTER_ADDR=$(scontrol show hostnames ... | head -n 1), so every
# node must resolve the others' host names to addresses they can reach (the usual Slurm setup).
#
# Timeouts, on purpose (environment variables; ualm_train puts the Megatron flags before ARGS,
# so a config or the command line can still override them):
#   DIST_TIMEOUT_MINUTES=15   collectives until the first iteration is done: the checkpoint load
#                             is one. A 7B checkpoint with the distributed optimizer is ~100 GB
#                             (bf16 weights, fp32 main weights, two Adam moments); one 8-GPU
#                             node reading all of it at 0.2 GB/s needs ~8.5 min, 16 nodes far
#                             less. Megatron's default (10 min) is too tight for the slow case.
#   DIST_TIMEOUT_AFTER_INIT=300   seconds, every collective after the first iteration
#                             (--distributed-timeout-seconds-after-init). A peer that died or
#                             lost its node breaks the connections at once (NCCL / gloo errors);
#                             this bounds a peer that hangs. It must exceed the longest
#                             legitimate wait inside one collective: an iteration's imbalance
#                             and a checkpoint save (the 7B config saves asynchronously, a few
#                             seconds in the collective; a synchronous save of ~100 GB from one
#                             node at 0.5 GB/s is ~200 s).
#   RDZV_TIMEOUT=600          seconds for every node's launcher to join the rendezvous (start-up,
#                             container images on many nodes; again after an in-job restart).
# A rank that fails (a timed-out collective included) exits, and the launcher then stops the
# node's other ranks; srun --kill-on-bad-exit=1 ends the other nodes' tasks.
#
# Hangs, fault tolerance: with FAULT_TOLERANCE=1, ualm_train starts nvidia-resiliency-ext's
# ft_launcher instead of torchrun and passes Megatron's --enable-ft-package: each rank reports the sections it is in
# (setup / step / checkpointing) to its node's rank monitor, which kills a rank that overstays
# one (a stopped process, a stuck collective, a stuck data-loader worker); the launchers then
# restart every rank (up to MAX_RESTARTS times), and the ranks resume from the last checkpoint.
#   FT_SECTION_TIMEOUTS=setup:1200,step:180,checkpointing:600   seconds per section (setup covers
#                             the checkpoint load, see above; step is one iteration)
#   FT_OUT_OF_SECTION_TIMEOUT=300   seconds between sections (logging, evaluation, the first
#                             --ft-num-warmup-iters iterations)
#   FT_CALC_TIMEOUTS=1        let Megatron tighten them from the observed times (--calc-ft-timeouts,
#                             kept in <save>/ft_state.json)
#   MAX_RESTARTS              in-job restarts of all ranks (default 3 with fault tolerance, else 0:
#                             a failed run ends the job, and Slurm's --requeue covers node loss)
#
# Other variables (all optional):
#   NPROC_PER_NODE   ranks per srun task (default: the task's GPUs, SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT      rendezvous port on the first node (default 20000 + job id mod 20000)
#   PYTHON           the interpreter the launchers run with (default python)
#   TORCHRUN, FT_LAUNCHER   launcher commands (default: PYTHON -m torch.distributed.run, and
#                    PYTHON -m nvidia_resiliency_ext.fault_tolerance.launcher)
#   CONTAINER_IMAGE, CONTAINER_MOUNTS   run the tasks inside a container (pyxis/enroot)
#   SRUN_ARGS        more srun flags (a bash array), e.g. (--nodes=2 --ntasks-per-node=1)
#
# TMPDIR: each task uses a new <TMPDIR or /tmp>/ualm-<job>-<task>-XXXXXX, removed when the task
# ends (the launchers leave torchelastic_* folders behind). A fresh name per task, not one per
# job id: job ids repeat across clusters (and test clusters) that share a /tmp.

ualm_train() {
  local module=$1; shift
  local flags=(--distributed-timeout-minutes "${DIST_TIMEOUT_MINUTES:-15}"
               --distributed-timeout-seconds-after-init "${DIST_TIMEOUT_AFTER_INIT:-300}")
  if [ "${FAULT_TOLERANCE:-0}" = 1 ]; then
    flags+=(--enable-ft-package)
    [ "${FT_CALC_TIMEOUTS:-0}" = 1 ] && flags+=(--calc-ft-timeouts)
    _ualm_srun ft "$module" "${flags[@]}" "$@"
  else
    _ualm_srun torchrun "$module" "${flags[@]}" "$@"
  fi
}

ualm_launch() {
  _ualm_srun torchrun "$@"
}

_ualm_srun() {  # torchrun|ft, module, the module's arguments...
  local kind=$1 module=$2; shift 2
  : "${SLURM_JOB_ID:?ualm_train / ualm_launch run inside a Slurm allocation (sbatch or salloc)}"
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}} PYTHON=${PYTHON:-python}
  export UALM_TMP_ROOT=${TMPDIR:-/tmp}
  local launcher_args=(--rdzv-conf "join_timeout=${RDZV_TIMEOUT:-600}")
  if [ "$kind" = ft ]; then
    export UALM_LAUNCHER=${FT_LAUNCHER:-$PYTHON -m nvidia_resiliency_ext.fault_tolerance.launcher}
    launcher_args+=(--max-restarts "${MAX_RESTARTS:-3}"
                    "--ft-rank-section-timeouts=${FT_SECTION_TIMEOUTS:-setup:1200,step:180,checkpointing:600}"
                    "--ft-rank-out-of-section-timeout=${FT_OUT_OF_SECTION_TIMEOUT:-300}")
  else
    export UALM_LAUNCHER=${TORCHRUN:-$PYTHON -m torch.distributed.run}
    launcher_args+=(--max-restarts "${MAX_RESTARTS:-0}")
  fi
  echo "${FUNCNAME[1]}: $module on job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), ${SLURM_NTASKS:-1} task(s) x" \
       "$NPROC_PER_NODE rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT," \
       "fault tolerance $([ "$kind" = ft ] && echo on || echo off)"
  # shellcheck disable=SC2016  # each task's own shell expands the variables
  srun --kill-on-bad-exit=1 "${SRUN_ARGS[@]}" \
    ${CONTAINER_IMAGE:+--container-image=$CONTAINER_IMAGE --container-mounts=${CONTAINER_MOUNTS:-/data:/data,/ckpt:/ckpt}} \
    bash -c 'TMPDIR=$(mktemp -d "$UALM_TMP_ROOT/ualm-$SLURM_JOB_ID-$SLURM_PROCID-XXXXXX") && export TMPDIR &&
             trap '\''rm -rf "$TMPDIR"'\'' EXIT
             $UALM_LAUNCHER --nnodes "$SLURM_NTASKS" --node-rank "$SLURM_PROCID" --nproc-per-node "$NPROC_PER_NODE" \
               --rdzv-id "$SLURM_JOB_ID-$MASTER_PORT" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" "$@"' _ \
    "${launcher_args[@]}" -m "$module" "$@"
}
