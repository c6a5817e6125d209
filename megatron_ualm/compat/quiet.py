"""One line, once per run, instead of Megatron's many "Transformer Engine / Apex missing" warnings.

Without Transformer Engine and Apex (every CPU machine, some GPU images), importing Megatron-Core
warns from five modules that it falls back to local implementations, torch warns that no CUDA
runtime is found, and every rank of a job repeats all of it. The facts are worth one line: the
first such warning prints a single summary on rank 0; the rest are dropped. Other warnings pass
through unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

_MISSING = re.compile(r"Transformer Engine and Apex are not installed|Apex is not installed|"
                      r"Transformer Engine is not installed|TE is not installed|"
                      r"transformer-engine>=[0-9.]+ supports .*your version is 0\.0\.0")
_SUMMARY = ("[megatron_ualm] Transformer Engine / Apex not installed: Megatron-Core's local layers, "
            "torch optimizers and unfused kernels are used (expected on CPU; on GPU install them for speed)")
_state = {"installed": False, "said": False}


# Set by the first process that prints the notice, for the processes it starts; a script that
# runs many (the post-training recipes) sets it after its first step.
_SAID_ENV = "UALM_FALLBACK_NOTICE_SHOWN"


def _first_to_say() -> bool:
    """Rank 0, and not a helper process it started (data workers, Megatron's spawned checkpoint
    manager inherit the environment, where the notice marks itself as said)."""
    return os.environ.get("RANK", "0") == "0" and not os.environ.get(_SAID_ENV)


def install() -> None:
    """Routes the fallback warnings to one summary line (idempotent, cheap: no heavy imports)."""
    if _state["installed"]:
        return
    _state["installed"] = True
    original = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _MISSING.search(str(message)):
            if not _state["said"] and _first_to_say():
                print(_SUMMARY, file=sys.stderr, flush=True)
                os.environ[_SAID_ENV] = "1"
            _state["said"] = True
            return
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    # Megatron-Core 0.19's own default (cuda_graph_modules="full") trips its deprecation warning in
    # every TransformerConfig; nothing here sets it.
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    # The loop is given a model-provider function on purpose (UALMModel is not one of Megatron's
    # ModelConfig families); Megatron recommends otherwise in a multi-line warning on every rank.
    warnings.filterwarnings("ignore", message=r"\s*It is recommended to use a ModelConfig")
    # torch.distributed.checkpoint, under Megatron's dist_checkpointing, warns on every load about
    # its own API evolution (ShardedTensor, argument order, single-process loads); none of it is
    # the user's to act on.
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
    warnings.filterwarnings("ignore", message="The argument order of load has been changed")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    # Megatron-Core asks for the rank before torch.distributed is up in tools that never start it
    # (build_blend, inspect_shards) and warns that it assumes rank 0, which is right there.
    warnings.filterwarnings("ignore", message="Could not determine rank from torch.distributed")
    # Importing Megatron-Core's MIMO package (which the loop does) warns that its config is
    # experimental; this project does not use MIMO models.
    warnings.filterwarnings("ignore", message="MimoModelConfig is experimental")
    # torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." at import on
    # machines without CUDA; nothing in this project compiles CUDA extensions.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # Megatron-Core's torch_dist strategy logs, at every save, that its own async-save
    # implementation is deprecated in favour of NVRx's; saves here are synchronous.
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(
        lambda record: "async save is deprecated" not in record.getMessage())
