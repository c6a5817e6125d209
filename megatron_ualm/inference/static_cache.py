"""A fixed-shape KV cache, so that a decode step can be captured once as a CUDA graph.

Decoding is bound by the host: at batch 16 with CFG a Qwen2.5-1.5B step costs about the same
at batch 1 and 16 (see ``benchmarks/RESULTS.md``), because each of the 28 layers launches
dozens of small kernels from Python. A CUDA graph replays the whole step with one launch, but
only if no tensor shape and no host-side value changes between steps. Megatron-Core's
``StaticInferenceContext`` does not allow that: each step attends over ``cache[:offset + 1]``
(one key more every step) and re-applies RoPE to every cached key; Megatron's own graphed
static decode (``flash_decode`` with ``cuda_graph_impl="local"``) needs the flash-attn package.

``StaticKVCache`` keeps Megatron's layers and only wraps each layer's core attention:

- the layer projects q/k/v and applies RoPE for the new column as in training, with explicit
  position ids (``UALMModel`` gathers the RoPE rows per position);
- the wrapper writes k/v into ``[S, N, groups, head_dim]`` buffers at a position held in a
  device tensor, and runs Megatron's core attention over all ``S`` slots with a mask that hides
  the slots not yet written and the prompts' left padding.

The prefill runs as an ordinary causal forward that also fills the buffers. Only Megatron's
local ``DotProductAttention`` is wrapped (its mask is a plain ``[N, 1, q, S]`` bool tensor);
the Transformer Engine spec keeps Megatron's inference context.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention


def has_local_attention(model) -> bool:
    """Whether every layer of this stage runs Megatron's local ``DotProductAttention``, which
    applies an explicit ``[N, 1, q, sk]`` mask (TE's, built with a causal mask type, ignores it)."""
    return all(isinstance(layer.self_attention.core_attention, DotProductAttention) for layer in model.decoder.layers)


class _CachedCoreAttention(torch.nn.Module):
    """One layer's core attention over the cache (same call signature as the module it wraps)."""

    def __init__(self, inner: DotProductAttention, cache: "StaticKVCache") -> None:
        super().__init__()
        self.inner = inner
        self.cache = cache
        self.key: Optional[torch.Tensor] = None  # [S, N, groups, head_dim]
        self.value: Optional[torch.Tensor] = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        cache = self.cache
        if self.key is None:
            shape = (cache.length, cache.rows) + tuple(key.shape[2:])
            self.key = key.new_zeros(shape)
            self.value = value.new_zeros(shape)
        if not cache.decoding:  # prefill: the prompt's columns, attended causally as usual
            n = key.shape[0]
            self.key[:n].copy_(key)
            self.value[:n].copy_(value)
            return self.inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                              attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        self.key.index_copy_(0, cache.write_position, key)
        self.value.index_copy_(0, cache.write_position, value)
        return self.inner(query, self.key, self.value, cache.mask, attn_mask_type=attn_mask_type,
                          attention_bias=attention_bias, packed_seq_params=packed_seq_params)


class StaticKVCache:
    """Keys and values of ``rows`` sequences up to ``length`` positions, in fixed-shape buffers.

    Args:
        rows: sequences decoded together (with CFG, the conditional and unconditional rows).
        length: positions per sequence (prompt + reply budget).
        device: where the buffers live.

    Use: ``with cache.attached(model):`` run the prefill forward, then ``cache.prefilled(valid)``;
    before each decode forward ``cache.advance(position)``, and pass ``cache.mask`` as the
    attention mask and ``cache.positions`` as the position ids.
    """

    def __init__(self, rows: int, length: int, device) -> None:
        self.rows, self.length = rows, length
        self.decoding = False
        self.write_position = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)  # RoPE position ids
        self.mask = torch.ones(rows, 1, 1, length, dtype=torch.bool, device=device)  # True = hidden
        self._layers: list[_CachedCoreAttention] = []

    @contextlib.contextmanager
    def attached(self, model):
        """Routes the core attention of every layer of this stage through the cache."""
        if not has_local_attention(model):
            raise ValueError(
                "the static KV cache wraps Megatron's local DotProductAttention: build the model with "
                "transformer_impl='local'"
            )
        attentions = [layer.self_attention for layer in model.decoder.layers]
        originals = [attn.core_attention for attn in attentions]
        self._layers = [_CachedCoreAttention(core, self) for core in originals]
        try:
            for attn, wrapped in zip(attentions, self._layers):
                attn.core_attention = wrapped
            yield self
        finally:
            for attn, core in zip(attentions, originals):
                attn.core_attention = core
            self._layers = []

    def prefilled(self, valid: torch.Tensor) -> None:
        """Marks the prompt's columns: ``valid`` ``[rows, L]`` is False on left padding."""
        self.mask[:, 0, 0, : valid.shape[1]] = ~valid
        self.decoding = True

    def advance(self, position: int) -> None:
        """The next forward writes (and attends to) the column at ``position``."""
        self.write_position.fill_(position)
        self.positions.fill_(position)
        self.mask[:, 0, 0, position] = False


@contextlib.contextmanager
def _no_rng_fork():
    """Megatron's attention forks the CUDA RNG state around its dropout even in eval mode, and
    setting an RNG state is not allowed while a CUDA graph captures; dropout is off here, so
    the fork is skipped while capturing."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        yield
    finally:
        del tracker.fork


class DecodeGraph:
    """Captures ``step`` (a decode forward on static buffers) once and replays it.

    ``step`` must read its inputs only from tensors that keep their storage between calls
    (the cache's ``mask`` / ``positions`` / ``write_position`` and the caller's input buffers)
    and return tensors; the replay overwrites those same output tensors.
    """

    def __init__(self, step: Callable[[], tuple]) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a GPU")
        self.step = step
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: Optional[tuple] = None

    def __call__(self) -> tuple:
        if self.graph is None:
            with _no_rng_fork():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up: lazy buffers and allocator pools settle
                        self.step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.outputs = self.step()
                self.graph = graph
        self.graph.replay()
        return self.outputs
