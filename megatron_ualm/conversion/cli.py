"""Hugging Face Qwen2.5 (+ audio encoder) <-> UALM Megatron checkpoints: ``tools/convert_checkpoint.py``
(also ``ualm-convert-checkpoint``).

Examples::

    # HF Qwen2.5-7B-Instruct + AF-Whisper encoder -> UALM checkpoint for TP=4, PP=2 (--load it)
    python tools/convert_checkpoint.py import --hf-dir Qwen2.5-7B-Instruct --audio-encoder af-whisper \\
        --codec hf-audio/xcodec-hubert-general --tensor-model-parallel-size 4 \\
        --pipeline-model-parallel-size 2 --output ckpt/ualm-7b-init

    # UALM checkpoint (any TP/PP) -> HF Qwen2ForCausalLM + audio parts
    python tools/convert_checkpoint.py export --load ckpt/ualm-7b --tokenizer Qwen2.5-7B-Instruct --output hf/ualm-7b
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

from megatron_ualm.launch import program_name

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def _overrides(items: List[str]) -> Dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--override {item!r}: expected FIELD=VALUE, e.g. num_codebooks=8")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Convert Hugging Face Qwen2.5 (+ audio encoder) checkpoints into UALM Megatron "
        "torch_dist checkpoints (import) and back (export). Tensors stream one layer at a time.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="HF Qwen2.5 directory -> UALM Megatron checkpoint (release, for --load)")
    imp.add_argument("--hf-dir", required=True, help="save_pretrained directory of a Qwen2ForCausalLM (safetensors)")
    imp.add_argument("--output", required=True, help="new --load directory to write")
    imp.add_argument("--flavor", default="auto",
                     help="auto (detect from config.json), a flavor name (checked), or hf (shapes from config.json)")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP the checkpoint is for (checked)")
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP the checkpoint is for (checked)")
    imp.add_argument("--text-vocab-size", type=int, default=None,
                     help="tokenizer size; special tokens go right after it (default: the flavor's, 151665)")
    imp.add_argument("--dtype", choices=sorted(_dtypes()), default=None, help="default: config.json's dtype")
    enc = imp.add_mutually_exclusive_group()
    enc.add_argument("--audio-encoder", default=None,
                     help="encoder directory to import (Qwen2-Audio / Audio Flamingo 3 / Whisper, encoder or full model)")
    enc.add_argument("--no-audio-encoder", action="store_true", help="a model without the audio-in path")
    imp.add_argument("--codec", default=None, help="codec identity to record: a name or a local directory (checked)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the initialisation of new rows and heads")
    imp.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                     help="any UALMConfig field, e.g. --override num_codebooks=8 (repeatable)")

    exp = sub.add_parser("export", help="UALM Megatron checkpoint -> HF Qwen2ForCausalLM + audio parts")
    exp.add_argument("--load", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt) "
                     "or one iter_*/release directory")
    exp.add_argument("--output", required=True, help="new HF directory to write")
    exp.add_argument("--tokenizer", default=None, help="the tokenizer to copy beside the weights: its folder, or its "
                     "tokenizer.json (its folder's other tokenizer files come along); checked against the checkpoint")
    exp.add_argument("--dtype", choices=sorted(_dtypes()), default=None, help="default: the checkpoint's")
    exp.add_argument("--flavor", default=None, help="optional: checkpoints describe their own model; when given it "
                     "is checked against the checkpoint (needed only for bare dist_checkpointing saves)")
    exp.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                     help="UALMConfig fields to change on export (rarely needed)")
    exp.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (memory stays near one shard)")

    for p in (imp, exp):
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _dtypes():
    return ("bfloat16", "float16", "float32")


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_ualm.compat import quiet

    quiet.install()  # before Megatron-Core is imported: its fallback warnings become one line
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from megatron_ualm.errors import CheckpointError
    from megatron_ualm.vocab import VocabMismatch

    start = time.time()
    try:
        if args.command == "import":
            from megatron_ualm.conversion.importer import import_hf

            path = import_hf(
                args.hf_dir, args.output, flavor=args.flavor,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                text_vocab_size=args.text_vocab_size, dtype=args.dtype, audio_encoder=args.audio_encoder,
                no_audio_encoder=args.no_audio_encoder, codec=args.codec, seed=args.seed,
                overrides=_overrides(args.override), progress=not args.no_progress,
            )
            print(f"wrote {path} in {time.time() - start:.1f}s; train from it with --pretrained-checkpoint "
                  f"{args.output} (finetune, dpo and pretrain take its model from it: no --flavor needed)")
        else:
            from megatron_ualm.conversion.exporter import export_hf

            path = export_hf(
                args.load, args.output, tokenizer=args.tokenizer, dtype=args.dtype, flavor=args.flavor,
                overrides=_overrides(args.override), max_shard_size=args.max_shard_size,
                progress=not args.no_progress,
            )
            print(f"wrote {path} in {time.time() - start:.1f}s")
    except (CheckpointError, VocabMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
