"""Shims that let Megatron-Core run on a CPU-only machine with the gloo backend.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the maths:
RNG bookkeeping, a few tensors created with ``device="cuda"``, stream synchronisation. Each
shim below names the call site it works around. ``apply()`` does nothing when CUDA is
available, so the code that runs on H100s is never touched; on a CPU machine (CI, a laptop)
it makes TP / PP / SP runs possible with several gloo processes on one host.

Call ``apply()`` before building models or parallel state. It is idempotent.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def cuda_available() -> bool:
    """True when a real CUDA device is present (then no shim is ever installed)."""
    return torch.cuda.is_available()


def default_backend() -> str:
    """The torch.distributed backend to use on this machine: nccl with CUDA, gloo without."""
    return "nccl" if cuda_available() else "gloo"


def _map_device(device):
    """Maps a device spec naming CUDA onto the CPU; anything else is returned unchanged."""
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Routes ``device="cuda"`` factories and ``.cuda()`` / ``.to("cuda")`` calls to the CPU.

    Works around hard-coded CUDA tensors, e.g. ``total_num_tokens = torch.zeros([],
    device="cuda")`` in ``pipeline_parallel/schedules.py`` and ``weight.data.cuda()`` in
    ``LanguageModule.setup_embeddings_and_output_layer``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _map_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def apply() -> None:
    """Installs the CPU shims when no CUDA device is present; a no-op otherwise."""
    global _APPLIED
    if _APPLIED or cuda_available():
        return
    _APPLIED = True

    # The JIT warm-up and @jit_fuser functions would otherwise compile with inductor on CPU,
    # which takes minutes on 2 cores and changes nothing numerically.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    # Tensors are created with device=torch.cuda.current_device() throughout megatron.core
    # (p2p shape tensors, VocabParallelEmbedding, TransformerBlock buffers).
    torch.cuda.current_device = lambda: "cpu"

    # p2p_communication._communicate_shapes / _batched_p2p_ops call torch.cuda.synchronize()
    # after batch_isend_irecv; gloo requests are already complete after wait().
    torch.cuda.synchronize = lambda *args, **kwargs: None

    # The model-parallel RNG tracker (tensor_parallel/random.py) saves, seeds and restores the
    # *CUDA* generator around tensor-parallel regions. On CPU every op draws from the CPU
    # generator, so the tracker's states must be CPU generator states for fork() to mean
    # anything (different dropout streams per TP rank, same across DP).
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(
        new_state
    )
    # fork() compares the CPU generator before and after the region and warns when it moved;
    # with the tracker living on the CPU generator that is expected whenever dropout runs.
    logging.getLogger(mp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )

    _CudaToCpuMode().__enter__()
