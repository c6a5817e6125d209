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


def load_ualm(*, tokenizer: str, load: Optional[str] = None, flavor: Optional[str] = None, codec: Optional[str] = None,
              codec_name: str = "xcodec", bf16: bool = False, transformer_impl: str = "local",
              audio_encoder_path: Optional[str] = None, upsampler: Optional[str] = None,
              upsampler_path: Optional[str] = None):
    """The generation API (``inference.UALM``) over a checkpoint or a random model, for tools.

    Call after ``api.initialize_parallel(tp, pp)``. ``generate``, ``evaluate`` and the
    post-training data tools build their model this one way.

    Args:
        tokenizer: tokenizer path (checked against the checkpoint's token-id layout).
        load: checkpoint (a ``--save`` directory or one iteration folder); None for a random
            model of ``flavor``.
        flavor: required without ``load``; optional (and checked) with it.
        codec: local codec checkpoint (audio out -> waveform); None keeps codes only.
        codec_name: codec registry name or ``package.module:ClassName``.
        bf16: bf16 weights and activations.
        transformer_impl: decoder backend (``local`` applies the padding masks of batched decoding).
        audio_encoder_path: local encoder weights overriding the checkpoint's.
        upsampler: ``package.module:ClassName`` of a post-processing hook, with ``upsampler_path``.

    Raises:
        CheckpointError, VocabMismatch: see ``load_model``.
    """
    from megatron_ualm import api
    from megatron_ualm.data.tokenizer import TextTokenizer
    from megatron_ualm.inference.audio import CodecDecoder, load_upsampler
    from megatron_ualm.inference.pipeline import UALM

    if load is None and flavor is None:
        raise CheckpointError("a random model needs a flavor (a checkpoint would describe its own model)")
    overrides = {"transformer_impl": transformer_impl}
    if audio_encoder_path:
        overrides["audio_encoder_path"] = audio_encoder_path
    text = TextTokenizer(tokenizer)
    if load is not None:
        model = load_model(load, flavor=flavor, tokenizer=text, bf16=bf16, **overrides)
    else:
        model = api.build_model(flavor, **({"bf16": True} if bf16 else {}), **overrides).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    decoder = CodecDecoder.load(codec, codec_name, device=device) if codec else None
    hook = load_upsampler(upsampler, upsampler_path, device=device) if upsampler else None
    return UALM(model, text, decoder, hook)
