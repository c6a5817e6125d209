"""Loading a model for generation, evaluation and the post-training data tools from a Megatron
distributed checkpoint; the command-line flags that name that model.

The checkpoint describes its own model (``megatron_ualm.checkpoint_format``): ``load_model`` builds
this rank's stage from the description at the current TP / PP and loads the weights, which
``dist_checkpointing`` reshards from whatever TP / PP they were saved at.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing

from megatron_ualm.errors import CheckpointError
from megatron_ualm.checkpoint_format import check_tokenizer, config_from_checkpoint, read_description, resolve_checkpoint


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

    description = read_description(path)
    if tokenizer is not None:
        check_tokenizer(description, tokenizer.identity(), path, str(getattr(tokenizer, "path", tokenizer)))
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


# ---------------------------------------------------------------------------------------------
# Command-line tools that decode (evaluate, the post-training data builders).

def is_writer() -> bool:
    """Global rank 0 (or no process group)."""
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def add_model_args(parser) -> None:
    """The flags that name the model and how it runs (shared by the subcommands that decode)."""
    g = parser.add_argument_group("model (evaluated by decoding; launch with torchrun for TP / PP)")
    g.add_argument("--load", help="Megatron checkpoint (a --save root or one iter_*/release dir); it describes its model")
    g.add_argument("--flavor", help="model flavor: required with --random-init, checked against --load otherwise")
    g.add_argument("--random-init", action="store_true", help="a randomly initialised model (smoke tests)")
    g.add_argument("--tokenizer", help="tokenizer.json, a folder holding one, or a sentencepiece .model")
    g.add_argument("--codec", help="local X-Codec folder (decodes generated audio)")
    g.add_argument("--codec-name", default="xcodec", help="codec registry name or package.module:ClassName")
    g.add_argument("--audio-encoder-path", help="local folder of the audio encoder's weights")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    g.add_argument("--seed", type=int, default=0)


def check_model_args(parser, args, need_codec: bool = False) -> None:
    """Refuses incomplete model flags at argument parsing."""
    if not args.load and not args.random_init:
        parser.error("give --load CHECKPOINT (or --random-init --flavor NAME for a smoke test)")
    if args.random_init and not args.flavor:
        parser.error("--random-init needs --flavor")
    if not args.tokenizer:
        parser.error("decoding needs --tokenizer")
    if need_codec and not args.codec:
        parser.error("generating audio to evaluate needs --codec (the X-Codec that decodes the codes)")


def build_ualm(args):
    """Initialises model parallelism and returns a ``UALM`` (model + tokenizer + codec) in eval mode."""
    from megatron_ualm import api
    from megatron_ualm.vocab import VocabMismatch

    api.initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed)
    try:
        return load_ualm(tokenizer=args.tokenizer, load=args.load, flavor=args.flavor,
                         codec=getattr(args, "codec", None), codec_name=getattr(args, "codec_name", "xcodec"),
                         bf16=args.bf16, audio_encoder_path=args.audio_encoder_path)
    except (CheckpointError, VocabMismatch) as err:
        raise SystemExit(f"error: {err}") from None
