"""The small public Python API: set up parallel state, build a model, run a batch.

Example (one process, CPU or GPU)::

    from megatron_ualm import api
    api.initialize_parallel()
    model = api.build_model("debug")
    result = api.run_batch(model, batch)   # batch: a UALMBatch
    result.loss, result.report["codebook_3 loss"]
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Tuple, Union

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.utils import get_attr_wrapped_model

from megatron_ualm.compat import cpu as cpu_compat
from megatron_ualm.config import UALMConfig, make_config
from megatron_ualm.data.batch import UALMBatch
from megatron_ualm.launch import free_port
from megatron_ualm.losses import ualm_loss
from megatron_ualm.models.ualm_model import UALMModel


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
) -> None:
    """Initialises torch.distributed (if needed), Megatron's parallel groups and RNG.

    Reads the usual ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables
    (torchrun, srun wrappers); without them starts a world of one on a free local port.
    Uses nccl on GPU and gloo on CPU (where it also installs the CPU shims).

    Args:
        tensor_model_parallel_size: TP size.
        pipeline_model_parallel_size: PP size.
        seed: base seed for Megatron's model-parallel RNG tracker.
        timeout_minutes: collective timeout; keep it small in tests so a deadlock fails fast.
        virtual_pipeline_model_parallel_size: model chunks per pipeline rank (interleaved
            schedule); build one model per chunk with ``build_model(..., vp_stage=i)``.
    """
    cpu_compat.apply()
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Without a launcher, a world of one on a free port; the environment is left alone so
        # that subprocesses (and later launchers) do not inherit a port this process holds.
        standalone = {} if "RANK" in os.environ else dict(
            init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
        torch.distributed.init_process_group(
            backend=cpu_compat.default_backend(),
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **standalone,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            distributed_timeout_minutes=int(max(1, timeout_minutes)),
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tears down Megatron's groups and the process group."""
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def build_model(
    flavor_or_config: Union[str, UALMConfig], vp_stage: Optional[int] = None, **overrides
) -> UALMModel:
    """Builds this rank's stage of a UALM model.

    Args:
        flavor_or_config: a flavor name (``debug``, ``qwen2.5-7b`` ...) or a ready config.
        vp_stage: virtual pipeline stage, for interleaved schedules.
        **overrides: config overrides when a flavor name is given; the parallel sizes are
            taken from the initialised parallel state unless given.

    Returns:
        The model on this rank's device (CPU without CUDA).
    """
    if isinstance(flavor_or_config, str):
        overrides.setdefault("tensor_model_parallel_size", parallel_state.get_tensor_model_parallel_world_size())
        overrides.setdefault("pipeline_model_parallel_size", parallel_state.get_pipeline_model_parallel_world_size())
        overrides.setdefault("use_cpu_initialization", not torch.cuda.is_available())
        config = make_config(flavor_or_config, **overrides)
    else:
        config = flavor_or_config
    model = UALMModel(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def is_packed(batch: UALMBatch) -> bool:
    """True when some row of the batch holds several documents."""
    return batch.cu_seqlens is not None and batch.cu_seqlens.numel() - 1 > batch.tokens.shape[0]


def as_one_row(batch: UALMBatch) -> UALMBatch:
    """The batch's rows laid end to end as one row ``[1, b * s]`` (for THD attention).

    ``cu_seqlens`` already indexes the flattened rows; attention, RoPE and the losses are
    per document or per position, so nothing else changes.
    """
    b, s = batch.tokens.shape
    flat = lambda t: t.reshape(1, b * s)  # noqa: E731
    flat_k = lambda t: t.transpose(0, 1).reshape(1, t.shape[1], b * s)  # noqa: E731  [b,K,s] -> [1,K,b*s]
    return dataclasses.replace(
        batch, tokens=flat(batch.tokens), codes=flat_k(batch.codes), position_ids=flat(batch.position_ids),
        labels=flat(batch.labels), loss_mask=flat(batch.loss_mask), code_labels=flat_k(batch.code_labels),
        code_loss_mask=flat_k(batch.code_loss_mask), attention_mask=None,
    )


def model_inputs(batch: UALMBatch, config: Optional[UALMConfig] = None) -> dict:
    """Keyword arguments of ``UALMModel.forward`` for a batch (labels included).

    Packed rows attend within their documents: on the local spec through the block-diagonal
    ``attention_mask`` and per-document ``position_ids``; on Transformer Engine through THD
    ``packed_seq_params`` (``cu_seqlens``; the caller lays the rows end to end with
    ``as_one_row`` first). Unpacked batches use the plain causal path.
    """
    inputs = dict(
        input_ids=batch.tokens,
        codes=batch.codes,
        audio_in_features=batch.audio_in_features,
        audio_in_lengths=batch.audio_in_lengths,
        labels=batch.labels,
        code_labels=batch.code_labels,
    )
    if config is not None and config.transformer_impl == "transformer_engine" and batch.cu_seqlens is not None and batch.tokens.shape[0] == 1:
        if batch.cu_seqlens.numel() > 2:
            cu = batch.cu_seqlens.to(device=batch.tokens.device, dtype=torch.int32)
            inputs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen,
            )
        return inputs
    if batch.attention_mask is not None:
        inputs.update(attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return inputs


def forward_step(data_iterator, model):
    """Megatron ``forward_step_func``: one micro-batch through ``model`` plus its loss.

    ``data_iterator`` yields ``UALMBatch`` objects; ``model`` may be wrapped (DDP,
    Float16Module).
    """
    batch = next(data_iterator)
    config = get_attr_wrapped_model(model, "config")
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    if config.transformer_impl == "transformer_engine" and is_packed(batch):
        batch = as_one_row(batch)
    batch = batch.to(device)
    output = model(**model_inputs(batch, config))
    return output, partial(ualm_loss, config, batch.loss_mask, batch.code_loss_mask)


@dataclass
class BatchResult:
    """Loss of one batch on a single-stage model.

    Attributes:
        loss: weighted sum of cross-entropies over supervised cells.
        num_tokens: supervised cells.
        report: ``[sum, count]`` per reported loss (``lm loss``, ``text loss``,
            ``codebook_{k} loss``).
    """

    loss: torch.Tensor
    num_tokens: torch.Tensor
    report: Dict[str, torch.Tensor]

    def mean(self, name: str = "lm loss") -> float:
        """A reported loss as a mean per cell."""
        total, count = self.report[name].tolist()
        return total / max(count, 1.0)


def run_batch(model: UALMModel, batch: UALMBatch) -> BatchResult:
    """Forward (with grad enabled as the caller chooses) and loss of one batch.

    Needs a model with both ``pre_process`` and ``post_process`` (PP=1); pipeline runs go
    through Megatron's schedules with ``forward_step``.
    """
    output, loss_fn = forward_step(iter([batch]), model)
    return BatchResult(*loss_fn(output))


def logits(model: UALMModel, batch: UALMBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary logits ``(text [b, s, V], codes [b, K, s, card])`` of a batch."""
    inputs = model_inputs(batch, model.config)
    inputs.update(labels=None, code_labels=None)
    return model(**inputs, gather_output=True)
