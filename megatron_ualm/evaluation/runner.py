"""Running the model under evaluation: build it from a checkpoint (or randomly, for smoke
tests), decode batches on every model-parallel rank, and read next-token scores.

Every rank of the model-parallel group calls the same functions with the same inputs (the
generator keeps the ranks in step); only the writer (global rank 0) writes files.
"""

from __future__ import annotations

from typing import Optional, Sequence


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
    from megatron_ualm.errors import CheckpointError
    from megatron_ualm.inference.checkpoint import load_ualm
    from megatron_ualm.vocab import VocabMismatch

    api.initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed)
    try:
        return load_ualm(tokenizer=args.tokenizer, load=args.load, flavor=args.flavor,
                         codec=getattr(args, "codec", None), codec_name=getattr(args, "codec_name", "xcodec"),
                         bf16=args.bf16, audio_encoder_path=args.audio_encoder_path)
    except (CheckpointError, VocabMismatch) as err:
        raise SystemExit(f"error: {err}") from None


def respond_batches(ualm, conversations: Sequence, params, modality: Optional[str], batch_size: int,
                    desc: str = "decoding") -> list:
    """``UALM.respond`` over batches, with a progress bar on the writer."""
    from megatron_ualm.evaluation.generation import progress

    replies = []
    with progress(len(conversations), desc, is_writer()) as bar:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start:start + batch_size]
            replies.extend(ualm.respond(chunk, params, modality))
            bar.update(len(chunk))
    return replies


def first_token_logits(ualm, conversations: Sequence, batch_size: int, desc: str = "scoring") -> list:
    """The text logits ``[V]`` of each reply's first token (the reply opened as a text message),
    on every rank (computed on the last pipeline stage and broadcast over the pipeline group)."""
    import torch
    from megatron.core import parallel_state

    from megatron_ualm.evaluation.generation import progress
    from megatron_ualm.inference import GREEDY, GenerationParams

    params = GenerationParams(text=GREEDY, cfg_weight=None, max_new_tokens=1, max_audio_segments=0, output_scores=True)
    out: list = []
    with progress(len(conversations), desc, is_writer()) as bar:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start:start + batch_size]
            prompts = [ualm.prompt(c, "text") for c in chunk]
            gens = ualm.generator.generate(prompts, params)
            logits = [g.scores[0][0] if g.scores else None for g in gens]
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                holder = [logits]
                torch.distributed.broadcast_object_list(
                    holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                    group=parallel_state.get_pipeline_model_parallel_group())
                logits = holder[0]
            out.extend(logits)
            bar.update(len(chunk))
    return out
