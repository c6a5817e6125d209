"""Running the model under evaluation: decode batches on every model-parallel rank, and read
next-token scores (the model itself comes from ``inference.checkpoint.build_ualm``).

Every rank of the model-parallel group calls the same functions with the same inputs (the
generator keeps the ranks in step); only the writer (global rank 0) writes files.
"""

from __future__ import annotations

from typing import Optional, Sequence


def respond_batches(ualm, conversations: Sequence, params, modality: Optional[str], batch_size: int,
                    desc: str = "decoding", unit: str = "prompt") -> list:
    """``UALM.respond`` over batches, with a progress bar on the writer."""
    from megatron_ualm.inference.checkpoint import is_writer
    from megatron_ualm.progress import progress_bar

    replies = []
    with progress_bar(len(conversations), desc, unit, is_writer()) as bar:
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

    from megatron_ualm.inference import GREEDY, GenerationParams
    from megatron_ualm.inference.checkpoint import is_writer
    from megatron_ualm.progress import progress_bar

    params = GenerationParams(text=GREEDY, cfg_weight=None, max_new_tokens=1, max_audio_segments=0, output_scores=True)
    out: list = []
    with progress_bar(len(conversations), desc, "question", is_writer()) as bar:
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
