"""Command lines of the data tools (``tools/*.py`` and the ``ualm-*`` console scripts call these
``main`` functions): preprocessing of the text, generation, understanding, chat and preference
families, ``build_blend`` and ``inspect_shards``. The codec (audio out) and encoder-window
(audio in) flags are one set of groups for every tool that stores audio.

Heavy modules (torch, Megatron-Core, transformers) are imported after argument parsing, and
manifests, paths and the output directory are checked before them, so ``--help`` and user
errors answer at once. A user error ends in one line on stderr saying what to do (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

from megatron_ualm.compat import quiet
from megatron_ualm.data.families import FAMILIES
from megatron_ualm.data.sources import add_corpus_arguments
from megatron_ualm.data.tasks import add_task_arguments
from megatron_ualm.files import atomic_json, atomic_write
from megatron_ualm.launch import program_name


_EPILOG = """
Output: <output>/<name>-00000/, -00001/, ... each a shard directory (shard.json sidecar,
text/codes/audio .bin/.idx streams, rejected.jsonl), plus <output>/<name>.rejected.jsonl
(<name>.task-IIIII-of-NNNNN.rejected.jsonl per task when split), <name>.run.json and, per
finished task, <name>.task-IIIII-of-NNNNN.json.
Rerunning the same command resumes: finished shards are kept, a crashed run's partial shard
is discarded and rewritten. Bad records are skipped and counted unless --strict. Errors in
the command (a missing manifest, a wrong path, an --output of another run) stop at once
with one line saying what to do (exit 2). Exit 1: a bad record under --strict, or every
record rejected (the run's files are still written, and say why).
"""


class UsageError(ValueError):
    """A command-line value that cannot work (told to the user in one line)."""


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _common(parser: argparse.ArgumentParser, default_per_shard: int) -> None:
    parser.add_argument("--input", nargs="+", required=True,
                        help="inputs, read in the order given: manifests (.jsonl or .parquet), or corpora as they "
                             "ship (WebDataset .tar shards, Lhotse cuts.jsonl.gz or Shar directories, Hugging Face "
                             "Parquet, WavCaps JSON; see --input-format). Globs and brace ranges such as "
                             "shards/laion-{000000..000099}.tar are expanded")
    parser.add_argument("--output", required=True, help="directory for the shards")
    parser.add_argument("--name", help="shard name prefix (default: the data family)")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer.json, a directory holding one (e.g. Qwen2.5), or a sentencepiece .model")
    parser.add_argument("--workers", type=_positive, default=1,
                        help="worker processes (default 1: in-process)")
    parser.add_argument("--records-per-shard", type=_positive, default=default_per_shard,
                        help=f"records per shard (default {default_per_shard}); whole tars, Shar shards and "
                             "Parquet row groups are packed into shards up to this many records, and a larger one "
                             "is cut into several shards that one task writes")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record (default: skip it and record the reason)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_corpus_arguments(parser)
    add_task_arguments(parser)


def _audio_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio-root",
                        help="directory relative audio paths are resolved against (default: the manifest's "
                             "directory); with --input-format wavcaps, the audio folder or .zip")
    parser.add_argument("--audio-decoder", choices=("soundfile", "dali", "auto"), default="soundfile",
                        help="soundfile: libsndfile + soxr resampling (default); dali: NVIDIA DALI's decoder "
                             "and resampler (pip install nvidia-dali-cuda130; runs on CPU too); auto: DALI "
                             "where installed")


def add_codec_args(parser: argparse.ArgumentParser, required: bool) -> None:
    """The audio-out flags (codec) of the tools that store codes.

    Args:
        parser: the tool's parser.
        required: the family is audio out (generation); otherwise a run without a codec takes
            no audio out, and records holding some are rejected with the reason.
    """
    g = parser.add_argument_group("audio out (codec)")
    without = ("" if required else " Without --codec or --codec-path the run takes no audio out: such records are "
               "rejected with the reason")
    g.add_argument("--codec", default=None,
                   help="codec: 'xcodec' (transformers XcodecModel; the default when --codec-path is given), "
                        "'package.module:Class' (a megatron_ualm.data.codec.Codec subclass), or 'precomputed' "
                        "(records carry codes)." + without)
    g.add_argument("--codec-path", help="local codec checkpoint directory (save_pretrained layout)")
    g.add_argument("--codec-device",
                   help="torch device for the codec (default: cuda when available; 'cuda' becomes the task's "
                        "own GPU, cuda:LOCAL_RANK, when several are visible)")
    g.add_argument("--codec-batch-size", type=_positive, default=8,
                   help="clips per codec call (default 8; equal-length clips of a step of 64 records share a "
                        "call, X-Codec cannot pad)")
    g.add_argument("--encode-in-main", action=argparse.BooleanOptionalAction, default=None,
                   help="with --workers > 1: the workers decode and resample audio, and the main process "
                        "holds the one codec and encodes their clips in batches (at most 2 x workers steps of "
                        "64 records in flight). Default: on when the codec runs on CUDA; off on CPU, where "
                        "each worker encodes with its own codec copy")
    g.add_argument("--num-codebooks", type=int, help="K to keep (default: the codec's; required for precomputed)")
    g.add_argument("--codebook-size", type=int, help="codes per codebook (precomputed codes only)")
    g.add_argument("--frame-rate", type=int, help="codec frames per second (precomputed codes only)")


def check_codec_args(parser: argparse.ArgumentParser, args: argparse.Namespace, required: bool) -> None:
    """Completes and checks ``add_codec_args``' flags (``parser.error`` on a bad combination)."""
    if args.codec is None and args.codec_path:
        args.codec = "xcodec"
    if args.codec is None and required:
        parser.error("give the codec that encodes the audio: --codec-path DIR (a local X-Codec checkpoint), or "
                     "--codec precomputed when the records carry codes")
    if args.codec == "precomputed":
        missing = [f"--{n.replace('_', '-')}" for n in ("num_codebooks", "codebook_size", "frame_rate")
                   if getattr(args, n) is None]
        if missing:
            parser.error(f"--codec precomputed needs {', '.join(missing)}")
    elif args.codec is not None and not args.codec_path:
        parser.error(f"--codec {args.codec} needs --codec-path")
    if args.encode_in_main and args.codec in (None, "precomputed"):
        parser.error("--encode-in-main runs a codec; give --codec-path")


def codec_kwargs(args: argparse.Namespace) -> dict:
    """Converter keyword arguments for the codec (``task_device`` resolves the device here)."""
    kwargs: dict = dict(codec_batch_size=args.codec_batch_size)
    if args.codec == "precomputed":
        kwargs["codec_identity"] = dict(name="precomputed", num_codebooks=args.num_codebooks,
                                        codebook_size=args.codebook_size, frame_rate=args.frame_rate)
    elif args.codec is not None:
        from megatron_ualm.data.tasks import task_device

        kwargs["codec"] = dict(name=args.codec, path=args.codec_path, device=task_device(args.codec_device),
                               num_codebooks=args.num_codebooks)
    return kwargs


def _codec_precheck(args: argparse.Namespace) -> Callable[[], None]:
    """The cheap check of the codec directory, before any model loads."""
    def precheck() -> None:
        from megatron_ualm.data.codec import check_checkpoint_dir

        if args.codec == "xcodec":
            check_checkpoint_dir(args.codec_path, "X-Codec", model_type="xcodec")
    return precheck


def _encode_in_main(args: argparse.Namespace, kwargs: dict) -> Callable[[], Optional[bool]]:
    """``Job.encode_in_main``: the flag, else on when the codec runs on CUDA."""
    def decide() -> Optional[bool]:
        device = (kwargs.get("codec") or {}).get("device")
        return args.encode_in_main if args.encode_in_main is not None or device is None else device.startswith("cuda")
    return decide


def add_audio_in_args(parser: argparse.ArgumentParser, optional: bool) -> None:
    """The audio-in flags (how clips for the frozen encoder are stored, its window).

    Args:
        parser: the tool's parser.
        optional: the family may hold no audio in (chat, preferences): ``--audio-in-storage
            none`` is offered, and records with audio in are then rejected with the reason.
    """
    g = parser.add_argument_group("audio in (frozen encoder)")
    choices = ("pcm16", "mel", "none") if optional else ("pcm16", "mel")
    g.add_argument("--audio-in-storage", choices=choices, default="pcm16",
                   help="pcm16: 16 kHz int16 samples (default; features computed while training); mel: valid "
                        "log-mel frames, float32 (more disk, no feature work while training)"
                        + ("; none: the run takes no audio in" if optional else ""))
    g.add_argument("--flavor", help="take --n-mels and --window-seconds from this model flavor's encoder "
                                    "(e.g. qwen2.5-7b, debug)")
    g.add_argument("--n-mels", type=int, default=128, help="mel bins of the encoder (default 128; debug flavor 16)")
    g.add_argument("--window-seconds", type=int, default=30,
                   help="encoder window in seconds (default 30; debug flavor 2)")


def audio_in_config(args: argparse.Namespace):
    """The ``AudioInConfig`` of ``add_audio_in_args``' flags (None for ``--audio-in-storage none``)."""
    from megatron_ualm.data.audio import AudioInConfig

    if args.audio_in_storage == "none":
        return None
    if not args.flavor:
        return AudioInConfig(args.n_mels, args.window_seconds)
    from megatron_ualm.config import make_config

    try:
        return AudioInConfig.from_model_config(make_config(args.flavor))
    except ValueError as err:
        raise UsageError(f"--flavor: {err}") from None


def _check_tokenizer(path: str) -> None:
    """Loads the tokenizer once, before the heavy imports, to report a wrong path in one line."""
    from megatron_ualm.data.tokenizer import TextTokenizer

    valid = "give a tokenizer.json, a directory holding one (e.g. a Qwen2.5 checkpoint), or a sentencepiece .model"
    try:
        TextTokenizer(path)
    except FileNotFoundError as err:
        raise UsageError(f"--tokenizer: {err}" + ("" if "give a" in str(err) else f"; {valid}")) from None
    except Exception as err:  # tokenizers / sentencepiece raise plain Exception / RuntimeError on foreign files
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UsageError(f"--tokenizer {path} cannot be read as a tokenizer ({reason}); {valid}") from None


def _run(args, family: str, converter: Callable[[], tuple], encode_in_main: Callable[[], Optional[bool]] = lambda: None,
         precheck: Callable[[], None] = lambda: None) -> int:
    """Checks the command's inputs, then runs the job (this task of it) and prints its summary.

    Args:
        args: parsed arguments (``_common``'s).
        family: default shard name.
        converter: builds the ``(class, kwargs)`` converter spec (imports the heavy modules).
        encode_in_main: ``Job.encode_in_main`` (called after ``converter``).
        precheck: the family's own cheap checks (e.g. the codec directory).

    Returns:
        0; 1 for a bad record under --strict or when every record was rejected (so a Slurm array
        task that kept nothing shows as failed; its files are written all the same); 2 for a user
        error.
    """
    quiet.install()
    from megatron_ualm.data.codec import CodecLoadError
    from megatron_ualm.data.preprocess import Job, ManifestError, StrictStop, check_output, open_manifests, run
    from megatron_ualm.data.sources import CorpusError, FieldError, expand_inputs, open_corpus
    from megatron_ualm.data.tasks import IncompleteOutput, OutputConflict, TaskError, check_split, resolve_task

    name = args.name or family
    try:
        task = resolve_task(args.num_tasks, args.task_index)
        corpus = open_corpus(args, family)  # None: manifests read as they are
        if corpus is None:
            # Manifests take globs and brace ranges too (train-*.parquet); open_manifests names a missing path.
            inputs = expand_inputs(args.input, keep_missing=True)
            manifests = open_manifests(inputs)
        else:
            inputs, manifests = corpus.files, None
        check_output(args.output)
        check_split(args.output, name, task)
        _check_tokenizer(args.tokenizer)
        precheck()
        if corpus is not None:
            corpus.check_mapping()  # counts the corpus, then maps its first record
        spec = converter()
        job = Job(converter=spec, inputs=inputs, output=args.output,
                  name=name, records_per_shard=args.records_per_shard, workers=args.workers, strict=args.strict,
                  progress=not args.no_progress, encode_in_main=encode_in_main(), corpus=corpus)
        summary = run(job, task=task, manifests=manifests)
    except StrictStop as err:
        print(f"error (--strict): {err}", file=sys.stderr)
        return 1
    except (ManifestError, OutputConflict, TaskError, IncompleteOutput, CodecLoadError, UsageError, CorpusError,
            FieldError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    if not summary.get("rejected"):
        return 0
    print(f"{summary['rejected']} of {summary['records']} records rejected (not in the shards); each one's source, "
          f"field and reason: {summary['rejected_file']}", file=sys.stderr)
    if summary.get("samples"):
        return 0
    if summary.get("reasons"):  # a shard written by an older version may not count its reasons
        reason, n = next(iter(summary["reasons"].items()))
        with open(summary["rejected_file"]) as f:
            first = json.loads(f.readline())
        where = f"field {first['field']!r}: " if first.get("field") else ""
        print(f"nothing was kept; most often ({n} records): {reason}; the first: {first['source']}: {where}"
              f"{first['reason']}", file=sys.stderr)
    return 1


def _root(args) -> str:
    return args.audio_root or os.path.dirname(os.path.abspath(args.input[0]))


def preprocess_text_main(argv: Optional[Sequence[str]] = None) -> int:
    """Text-reasoning family: plain text and chat records -> token shards."""
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Tokenise text records into UALM token shards (the text family). A record is "
                    '{"text": "..."} (one trained assistant message) or {"messages": [{"role": '
                    '"system|user|assistant", "content": "..."}]} (a chat; loss on assistant turns).',
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, 10000)
    args = parser.parse_args(argv)

    def converter() -> tuple:
        from megatron_ualm.data.records import TextConverter

        return TextConverter, dict(tokenizer=args.tokenizer)

    return _run(args, "text", converter)


def preprocess_generation_main(argv: Optional[Sequence[str]] = None) -> int:
    """Generation family: audio clip + caption -> caption tokens and codec codes."""
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Encode text-to-audio records into UALM token shards (the generation family). "
                    'A record is {"audio": path|bytes, "start": s, "end": s, "caption": "...", '
                    '"rich_caption": {"keywords", "layout", "description"}} or carries precomputed '
                    '"codes" ([K][T] integers) instead of "audio". Audio is decoded, downmixed, '
                    "resampled to the codec's rate and encoded into K x T codes.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, 1000)
    _audio_root(parser)
    add_codec_args(parser, required=True)
    parser.add_argument("--rich-caption", choices=("plan", "condition"), default="plan",
                        help="plan: the rich caption is an assistant text plan before the audio (default); "
                             "condition: it replaces the caption as the user's condition")
    args = parser.parse_args(argv)
    check_codec_args(parser, args, required=True)
    kwargs: dict = {}

    def converter() -> tuple:
        from megatron_ualm.data.records import GenerationConverter

        kwargs.update(codec_kwargs(args))
        return GenerationConverter, dict(tokenizer=args.tokenizer, rich_caption=args.rich_caption,
                                         audio_decoder=args.audio_decoder, audio_root=_root(args), **kwargs)

    return _run(args, "generation", converter, _encode_in_main(args, kwargs), _codec_precheck(args))


def preprocess_understanding_main(argv: Optional[Sequence[str]] = None) -> int:
    """Understanding family: audio clip + conversation -> text tokens and stored audio."""
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Store audio-understanding records as UALM token shards (the understanding family). "
                    'A record (Audio Flamingo 3 style) is {"sound"|"audio": path|bytes, "start": s, "end": s, '
                    '"conversations": [{"from": "human", "value": "<sound>\\nQuestion"}, {"from": "gpt", '
                    '"value": "Answer"}]} (or "messages" with role/content). The clip goes where the <sound> marker is (one '
                    "marker at most); a conversation without a <sound> marker gets the clip at the start of its "
                    "first user turn (after any system turn), and is kept, not rejected. Audio is stored as 16 kHz PCM or as Whisper log-mel features for the frozen encoder.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, 1000)
    _audio_root(parser)
    add_audio_in_args(parser, optional=False)
    args = parser.parse_args(argv)

    def converter() -> tuple:
        from megatron_ualm.data.records import UnderstandingConverter

        return UnderstandingConverter, dict(tokenizer=args.tokenizer, storage=args.audio_in_storage,
                                            audio_decoder=args.audio_decoder, audio_in=audio_in_config(args),
                                            audio_root=_root(args))

    return _run(args, "understanding", converter)


def _no_such_paths(paths: Sequence[str]) -> bool:
    """Says which shard arguments match nothing (before Megatron-Core loads); True if any."""
    import glob

    missing = [p for p in paths if not glob.glob(p)]
    if missing:
        print(f"error: {', '.join(missing)}: no such shard directory, output directory or glob; give the --output "
              "of a preprocessing tool, a shard directory in it, or a glob such as shards/*", file=sys.stderr)
    return bool(missing)


def build_blend_main(argv: Optional[Sequence[str]] = None) -> int:
    """Writes the pretraining blend from shard sidecars and prints the mixture table."""
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Build the UALM pretraining blend from shard sidecars. Each shard's weight is its "
                    "token count times its family's up-sampling factor (understanding 1x, generation 2x, "
                    "text 1x by default, as in the paper). Writes a blend JSON (read by "
                    "megatron_ualm.data.blend.load_plan) and a Megatron --data-path file "
                    "(weight prefix pairs), and prints the mixture table.")
    parser.add_argument("shards", nargs="+", help="shard directories, output directories holding shards, or globs")
    parser.add_argument("--output", required=True, help="blend JSON to write (the --data-path file goes next to it)")
    parser.add_argument("--upsample", action="append", default=[], metavar="FAMILY=FACTOR",
                        help="up-sampling factor of a family, e.g. generation=2 (repeatable)")
    args = parser.parse_args(argv)
    factors = {}
    for item in args.upsample:
        fam, _, value = item.partition("=")
        try:
            factors[fam] = float(value)
        except ValueError:
            parser.error(f"--upsample {item!r}: expected FAMILY=FACTOR, e.g. generation=2")
        if fam not in FAMILIES or factors[fam] <= 0:
            parser.error(f"--upsample {item!r}: family must be one of {', '.join(FAMILIES)}, factor > 0")
    if _no_such_paths(args.shards):
        return 1
    quiet.install()
    from megatron_ualm.data.blend import find_shards, format_table, plan_blend
    from megatron_ualm.data.tasks import check_complete

    try:
        shards = find_shards(args.shards)
        check_complete(shards)  # a run split across tasks blends only when every task finished
        plan = plan_blend(shards, factors)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    atomic_json(args.output, plan.to_json())
    data_path = atomic_write(os.path.splitext(args.output)[0] + ".data_path.txt",
                             " ".join(f"{w:.10g} {p}" for p, w in zip(plan.shards, plan.weights)) + "\n")
    print(format_table(plan))
    print(f"wrote {args.output} and {data_path}")
    return 0


def inspect_shards_main(argv: Optional[Sequence[str]] = None) -> int:
    """Prints samples and statistics of shards, and validates them."""
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Inspect UALM shards: print records as readable interleaved text/audio "
                    "(<audio-in 12.0 s>, <audio-out 250 frames x 8>), print statistics, and validate "
                    "(index offsets, value ranges, stream alignment, sidecar consistency, and that every task "
                    "of a run split with --num-tasks finished). Exits 1 when a shard fails validation or "
                    "tasks are missing.")
    parser.add_argument("shards", nargs="+", help="shard directories, output directories holding shards, or globs")
    parser.add_argument("--show", type=int, default=2, help="records to print per shard (default 2)")
    parser.add_argument("--start", type=int, default=0, help="first record to print (default 0)")
    parser.add_argument("--tokenizer", help="decode text with this tokenizer (default: the one in the sidecar, if present)")
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--validate", dest="validate", action="store_true", default=True,
                       help="validate the shards, and that every task of a split run finished (the default)")
    check.add_argument("--no-validate", dest="validate", action="store_false", help="skip validation")
    args = parser.parse_args(argv)
    if _no_such_paths(args.shards):
        return 2
    quiet.install()
    from megatron_ualm.data.blend import find_shards
    from megatron_ualm.data.inspect import describe_record, shard_stats, validate_shard
    from megatron_ualm.data.shards import ShardReader
    from megatron_ualm.data.tasks import IncompleteOutput, check_complete
    from megatron_ualm.data.tokenizer import TextTokenizer

    try:
        paths = find_shards(args.shards)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    incomplete = []
    if args.validate:
        try:
            check_complete(paths)
        except IncompleteOutput as err:
            incomplete = str(err).splitlines()
    failed = 0
    tokenizers: dict = {}
    for path in paths:
        print(f"== {path}")
        problems = validate_shard(path) if args.validate else []
        if problems:
            failed += 1
            print("INVALID:")
            for p in problems:
                print(f"  - {p}")
            continue
        reader = ShardReader(path)
        print(json.dumps(shard_stats(reader)))
        tok_path = args.tokenizer or reader.meta["tokenizer"]["path"]
        if tok_path not in tokenizers:
            tokenizers[tok_path] = TextTokenizer(tok_path) if os.path.exists(tok_path) else None
        for d in range(args.start, min(len(reader), args.start + args.show)):
            print(f"-- record {d}")
            print(describe_record(reader.document(d), tokenizers[tok_path],
                                  (reader.meta.get("codec") or {}).get("frame_rate")))
    if args.validate:
        for line in incomplete:
            print(f"INCOMPLETE: {line}")
        print("all shards valid" if not failed else f"{failed} shard(s) INVALID")
        if incomplete:
            print(f"{len(incomplete)} problem(s) with the task split: a blend of these shards is refused")
    return 1 if failed or incomplete else 0


# ---------------------------------------------------------------------------------------------
# The post-training data tools (chat shards for SFT, preference shards for DPO).

def _post_training_tool(argv: Optional[Sequence[str]], family: str, description: str, converter_class: str,
               add_args: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
               converter_kwargs: Callable[[argparse.Namespace], dict] = lambda args: {}) -> int:
    """A post-training data tool (chat, preferences): the shared flags, both audio groups, the runner.

    Args:
        argv: the command line (None: ``sys.argv``).
        family: shard family and default ``--name``.
        description: ``--help`` text.
        converter_class: the converter's name in ``megatron_ualm.data`` (``chat.ChatConverter``).
        add_args: the tool's own flags.
        converter_kwargs: the tool's own converter arguments (may raise ``UsageError``).
    """
    parser = argparse.ArgumentParser(prog=program_name(), description=description, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, 1000)
    _audio_root(parser)
    add_codec_args(parser, required=False)
    add_audio_in_args(parser, optional=True)
    add_args(parser)
    args = parser.parse_args(argv)
    check_codec_args(parser, args, required=False)

    kwargs: dict = {}

    def converter() -> tuple:
        import importlib

        module, _, name = converter_class.rpartition(".")
        cls = getattr(importlib.import_module(f"megatron_ualm.data.{module}"), name)
        kwargs.update(codec_kwargs(args))
        audio_in = audio_in_config(args)
        if audio_in is not None:
            kwargs.update(audio_in=audio_in, audio_in_storage=args.audio_in_storage)
        kwargs.update(tokenizer=args.tokenizer, audio_root=_root(args), audio_decoder=args.audio_decoder,
                      **converter_kwargs(args))
        return cls, kwargs

    return _run(args, family, converter, _encode_in_main(args, kwargs), _codec_precheck(args))


def _loss_overrides(args: argparse.Namespace) -> dict:
    from megatron_ualm.data.chat import parse_loss_overrides

    try:
        return {"loss": parse_loss_overrides(args.loss)}
    except ValueError as err:
        raise UsageError(str(err)) from None


def _loss_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", action="append", default=[], metavar="PART=on|off",
                        help="train (on) or not (off) on a part for every record, e.g. audio_1=on; parts: system, "
                             "user, assistant, prompt, plan, audio, question, answer, audio_1, caption_1, critique, "
                             "audio_2 (a record's own \"loss\": {part: bool} wins)")


def preprocess_chat_main(argv: Optional[Sequence[str]] = None) -> int:
    """Chat and UALM-Reason records -> ``chat`` shards for ``python -m megatron_ualm.finetune``."""
    return _post_training_tool(
        argv, "chat",
        "Turn SFT conversations into UALM token shards (the chat family). A record is "
        '{"messages": [{"role": "system|user|assistant", "content": "..." | "audio": path | '
        '"codes": [[...]], "loss": bool, "condition": bool, "part": name}, ...]} (audio in a user turn '
        "is audio in, in an assistant turn audio out), or a UALM-Reason kind: "
        '{"kind": "enrichment", "prompt", "rich_caption", "audio"|"codes"}, {"kind": "dialogue", '
        '"prompt", "turns": [{"question", "answer"}], "rich_caption", "audio"|"codes"}, '
        '{"kind": "self_reflection", "prompt", "rich_caption", "audio_1"|"codes_1", "caption_1", '
        '"critique", "audio_2"|"codes_2"}. Loss is on assistant messages except audio 1 of a '
        "self-reflection sample (the model's own flawed first attempt); the user text before an "
        "audio-out reply is its CFG condition. Schema: megatron_ualm/data/chat.py.",
        "chat.ChatConverter", _loss_flag, _loss_overrides)


def preprocess_preferences_main(argv: Optional[Sequence[str]] = None) -> int:
    """Preference manifest (prompt, chosen, rejected) -> ``preference`` shards for ``python -m megatron_ualm.dpo``."""
    return _post_training_tool(
        argv, "preference",
        "Turn a DPO preference manifest into paired UALM shards (the preference family). A record is "
        '{"prompt": "text" | [chat messages], "chosen": <response>, "rejected": <response>} where a '
        'response is text, one message ({"content"}, {"audio": path} or {"codes": [[...]]}) or a list '
        "of assistant messages (e.g. a caption, then audio); other fields (id, scores) are ignored. "
        "Records with a missing side, chosen identical to rejected, or missing / undecodable audio are "
        "named in <output>/preference.rejected.jsonl and skipped (--strict stops at the first). Schema: "
        "megatron_ualm/data/preference.py.",
        "preference.PreferenceConverter")
