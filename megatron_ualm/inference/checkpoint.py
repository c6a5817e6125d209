"""Loading a model for generation and evaluation from a Megatron distributed checkpoint.

The checkpoint describes its own model (``megatron_ualm.model_record``): ``load_model`` builds
this rank's stage from the record at the current TP / PP and loads the weights, which
``dist_checkpointing`` reshards from whatever TP / PP they were saved at.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing

from megatron_ualm.errors import CheckpointError
from megatron_ualm.model_record import check_tokenizer, config_from_checkpoint, read_record, resolve_checkpoint


def load_checkpoint(model, path: str) -> None:
    """Loads weights into ``model`` (any TP; dist_checkpointing reshards).

    Tensors are matched by their global sharded keys, so a Megatron-LM ``--save`` checkpoint
    (model under ``model``) and a bare ``dist_checkpointing.save(model.sharded_state_dict())``
    both load.
    """
    path = resolve_checkpoint(path)
    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} model tensors, e.g. {missing[:3]}")


def load_model(path: str, *, flavor: Optional[str] = None, tokenizer=None, bf16: bool = False,
               transformer_impl: str = "local", **overrides: Any):
    """This rank's stage of the model a checkpoint describes, with its weights, in eval mode.

    Call after ``api.initialize_parallel(tp, pp)``; the parallel sizes come from there.

    Args:
        path: a ``--save`` directory (its latest iteration) or one ``iter_*`` / ``release`` folder.
        flavor: optional; checked against the checkpoint's own description.
        tokenizer: a ``TextTokenizer`` (anything with ``identity()``) to check against the
            checkpoint's token-id layout; None skips the check.
        bf16: bf16 weights and activations (default float32, whatever the checkpoint's dtype).
        transformer_impl: ``local`` (default: applies the padding masks batched decoding needs)
            or ``transformer_engine``.
        **overrides: further run-time ``UALMConfig`` fields (e.g. ``audio_encoder_path``).

    Raises:
        CheckpointError: the checkpoint is missing, undescribed without ``flavor``, or does not
            match ``flavor``.
        VocabMismatch: ``tokenizer`` is not the one the checkpoint was trained with.
    """
    from megatron.core import parallel_state

    from megatron_ualm import api

    record = read_record(path)
    if tokenizer is not None:
        check_tokenizer(record, tokenizer.identity(), path, str(getattr(tokenizer, "path", tokenizer)))
    fields = dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=not torch.cuda.is_available(),
        transformer_impl=transformer_impl,
    )
    # The weights load into the dtype asked for here, whatever dtype they were saved in.
    fields.update(bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    fields.update(overrides)
    config = config_from_checkpoint(path, flavor, **fields)
    model = api.build_model(config)
    load_checkpoint(model, path)
    model.eval()
    return model
