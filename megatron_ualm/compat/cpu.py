"""Shims that let Megatron-Core run on a CPU-only machine with the gloo backend.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the maths:
RNG bookkeeping, a few tensors created with ``device="cuda"``, stream synchronisation. Each
shim below names the call site it works around. ``apply()`` does nothing when CUDA is
available, so the code that runs on H100s is never touched; on a CPU machine (CI, a laptop)
it makes TP / PP / SP runs possible with several gloo processes on one host.

Call ``apply()`` before building models or parallel state. It is idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

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


# Factories that take a ``device=``; Megatron creates tensors with device="cuda" in ~20 places
# (schedules.py's total_num_tokens, get_default_causal_mask, checkpointing, the optimizer).
_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn",
    "randint", "randperm", "linspace", "eye", "empty_strided", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like",
)


def _on_cpu(factory):
    """Wraps a torch factory so that a CUDA ``device=`` becomes the CPU."""

    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        return factory(*args, **kwargs)

    wrapper.__wrapped__ = factory
    return wrapper


def _to_on_cpu(to):
    """Wraps ``Tensor.to`` so that ``.to("cuda")`` / ``.to(device="cuda")`` stay on the CPU."""

    def wrapper(self, *args, **kwargs):
        if args:
            args = (_map_device(args[0]), *args[1:])
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        return to(self, *args, **kwargs)

    return wrapper


def _cuda_type_names(type_):
    """Wraps ``Tensor.type`` so a CPU tensor reports (and converts to) CUDA type names.

    The optimizer and ``clip_grads.py`` assert ``param.grad.type() == 'torch.cuda.FloatTensor'``.
    """

    def wrapper(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = type_(self)
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.", 1)
        return type_(self, dtype, non_blocking, **kwargs)

    return wrapper


class _NoStream:
    """Stands in for ``torch.cuda.Stream`` / ``Event``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self) -> bool:
        return True


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

    # DDP's grad buffers (distributed/param_and_grad_buffer.py) order the grad all-reduce
    # against the compute stream with current_stream() / Stream / Event / stream(); on CPU
    # every op is synchronous, so these are no-ops.
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()

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

    # Module attributes rather than a TorchFunctionMode: a mode is thread-local and is switched
    # off while it handles a call, so it would not reach the forward that activation
    # recomputation re-runs inside torch.autograd.backward.
    # torch.utils._device caches the set of factory functions that `with torch.device(...)`
    # (meta-device init in transformers' from_pretrained) intercepts; fill that cache with the
    # real functions before wrapping them, or it never matches and buffers stay uninitialised.
    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.to = _to_on_cpu(torch.Tensor.to)
    torch.Tensor.type = _cuda_type_names(torch.Tensor.type)


class _CudaPresent:
    """``torch.cuda`` as ``megatron/training/initialize.py`` must see it on a CPU machine."""

    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    set_device = staticmethod(lambda *args, **kwargs: None)
    empty_cache = staticmethod(lambda: None)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithCudaPresent:
    """The ``torch`` module seen through ``_CudaPresent``; CUDA devices it names are the CPU."""

    cuda = _CudaPresent()

    @staticmethod
    def device(*args, **kwargs):
        return torch.device("cpu") if args and str(args[0]).startswith("cuda") else torch.device(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


def _resident_mb() -> tuple[float, float]:
    """This process's resident set size now and at its peak, in MiB (Linux; 0 where unknown)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    try:
        with open("/proc/self/statm") as statm:
            now = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024.0**2
    except (OSError, ValueError, IndexError):
        now = 0.0
    return now, peak


def _report_host_memory(name, process_group=None):
    """``megatron.training``'s ``report_memory`` for a CPU run: the host memory of the process.

    The original prints CUDA allocator counters, all 0.00 without CUDA; the same line (rank 0 of
    the data-parallel group, the same moments) gives the resident memory instead.
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_pg_rank

    dp_rank = get_pg_rank(process_group) if process_group is not None else (
        parallel_state.get_data_parallel_rank())
    if dp_rank == 0:
        now, peak = _resident_mb()
        print(f"[Rank {torch.distributed.get_rank()}] {name} host memory (MB) | resident: {now:.0f}"
              f" | peak resident: {peak:.0f}", flush=True)


def apply_training() -> None:
    """Also shims ``megatron.training`` (the Megatron-LM loop) for CPU; a no-op with CUDA.

    ``initialize_megatron`` asserts CUDA, and its ``torch.cuda.device_count() > 0`` guards skip
    creating the model-parallel groups and the model-parallel RNG seeds when there is no
    GPU. The module alone sees a ``torch`` whose ``cuda`` reports one device.
    """
    apply()
    if cuda_available():
        return
    from megatron.training import arguments, initialize

    initialize.torch = _TorchWithCudaPresent()
    # validate_args probes the GPU's architecture when TP > 1 (to demand
    # CUDA_DEVICE_MAX_CONNECTIONS=1 before Blackwell); answer as a Hopper-class device and
    # satisfy that demand, which is meaningless without CUDA streams.
    arguments.get_device_arch_version = lambda: 9
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    # The loop reports memory after its first iterations and around the first saves with CUDA
    # allocator counters (``training.report_memory``, imported there by name); on the CPU they
    # read 0.00, so the same lines report the process's resident memory.
    from megatron.training import training

    training.report_memory = _report_host_memory

    # Without apex or TE, the distributed optimizer wraps torch's Adam, whose state is empty
    # until the first step; DistributedOptimizer.state_dict() then asserts on the missing
    # 'step' while --load builds the template to load into. Megatron's own remedy for that
    # (_init_optimizer_states_with_dummy_values, used for FSDP) fills the states first; the
    # loaded checkpoint then overwrites them and the fp32 main parameters.
    from megatron.core.optimizer import distrib_optimizer

    if not distrib_optimizer.HAVE_APEX_OR_TE:
        sharded_state_dict = distrib_optimizer.DistributedOptimizer.sharded_state_dict

        def sharded_state_dict_with_states(self, model_sharded_state_dict={}, is_loading=False, *args, **kwargs):
            if is_loading and not self.optimizer.state:
                self._init_optimizer_states_with_dummy_values()
            return sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

        distrib_optimizer.DistributedOptimizer.sharded_state_dict = sharded_state_dict_with_states

        # The dummy step leaves torch Adam's per-parameter 'step' at 1; the checkpoint's step
        # comes back in the param groups (where state_dict() stored it), so copy it into the
        # states, or Adam's bias correction would restart after a resume.
        load_state_dict = distrib_optimizer.DistributedOptimizer.load_state_dict

        def load_state_dict_with_steps(self, state_dict):
            result = load_state_dict(self, state_dict)
            for group in self.optimizer.param_groups:
                if group.get("step") is None:
                    continue
                for param in group["params"]:
                    state = self.optimizer.state.get(param)
                    if state and "step" in state:
                        state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)
            return result

        distrib_optimizer.DistributedOptimizer.load_state_dict = load_state_dict_with_steps
