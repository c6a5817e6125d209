"""Command lines of the post-training data tools (``tools/preprocess_chat.py``,
``tools/preprocess_preferences.py``).

Both run on the shared preprocessing runner (``megatron_ualm.data.preprocess``): resumable
shards, bad records named in ``rejected.jsonl`` or ``--strict``, ``--workers`` (with
``--encode-in-main`` for one GPU codec), and the task split (``--num-tasks`` / ``--task-index``). Heavy modules load after argument parsing, so
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

from megatron_ualm.data.cli import _EPILOG, UsageError, _audio_root, _common, _positive, _root, _run


def _add_audio_args(parser: argparse.ArgumentParser) -> None:
    """Codec (audio out) and encoder-window (audio in) flags."""
    _audio_root(parser)
    g = parser.add_argument_group("audio out (codec)")
    g.add_argument("--codec", default=None,
                   help="codec for assistant audio clips: 'xcodec' (transformers XcodecModel; the default when "
                        "--codec-path is given), 'package.module:Class' (a megatron_ualm.data.codec.Codec), or "
                        "'precomputed' (records carry codes). Without --codec or --codec-path the run takes no audio "
                        "out: such records are rejected with the reason")
    g.add_argument("--codec-path", help="local codec checkpoint directory (save_pretrained layout)")
    g.add_argument("--codec-device", help="torch device for the codec (default: cuda when available)")
    g.add_argument("--codec-batch-size", type=_positive, default=8, help="clips per codec call (default 8)")
    g.add_argument("--encode-in-main", action=argparse.BooleanOptionalAction, default=None,
                   help="with --workers > 1: the workers decode audio and this process holds the one codec and "
                        "encodes their clips (default: on when the codec runs on CUDA)")
    g.add_argument("--num-codebooks", type=int, help="K to keep (default: the codec's; required for precomputed)")
    g.add_argument("--codebook-size", type=int, help="codes per codebook (precomputed codes only)")
    g.add_argument("--frame-rate", type=int, help="codec frames per second (precomputed codes only)")
    g = parser.add_argument_group("audio in (frozen encoder)")
    g.add_argument("--audio-in-storage", choices=("pcm16", "mel", "none"), default="pcm16",
                   help="how user audio is stored: pcm16 (16 kHz int16, default), mel (valid log-mel frames), or "
                        "none (the run takes no audio in)")
    g.add_argument("--flavor", help="take --n-mels and --window-seconds from this model flavor's encoder "
                                    "(e.g. qwen2.5-7b, debug)")
    g.add_argument("--n-mels", type=int, default=128, help="mel bins of the encoder (default 128; debug flavor 16)")
    g.add_argument("--window-seconds", type=int, default=30, help="encoder window in seconds (default 30; debug 2)")


def _check_audio_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.codec is None and args.codec_path:
        args.codec = "xcodec"
    if args.codec == "precomputed":
        missing = [f"--{n.replace('_', '-')}" for n in ("num_codebooks", "codebook_size", "frame_rate")
                   if getattr(args, n) is None]
        if missing:
            parser.error(f"--codec precomputed needs {', '.join(missing)}")
    elif args.codec is not None and not args.codec_path:
        parser.error(f"--codec {args.codec} needs --codec-path")
    if args.encode_in_main and args.codec in (None, "precomputed"):
        parser.error("--encode-in-main runs a codec; give --codec-path")


def _audio_kwargs(args: argparse.Namespace) -> dict:
    """Converter keyword arguments for the codec and the encoder window (heavy imports here)."""
    from megatron_ualm.data.audio import AudioInConfig

    kwargs: dict = dict(audio_root=_root(args), audio_decoder=args.audio_decoder, codec_batch_size=args.codec_batch_size)
    if args.codec == "precomputed":
        kwargs["codec_identity"] = dict(name="precomputed", num_codebooks=args.num_codebooks,
                                        codebook_size=args.codebook_size, frame_rate=args.frame_rate)
    elif args.codec is not None:
        from megatron_ualm.data.tasks import task_device

        kwargs["codec"] = dict(name=args.codec, path=args.codec_path, device=task_device(args.codec_device),
                               num_codebooks=args.num_codebooks)
    if args.audio_in_storage != "none":
        if args.flavor:
            from megatron_ualm.config import make_config

            try:
                audio_in = AudioInConfig.from_model_config(make_config(args.flavor))
            except ValueError as err:
                raise UsageError(f"--flavor: {err}") from None
        else:
            audio_in = AudioInConfig(args.n_mels, args.window_seconds)
        kwargs.update(audio_in=audio_in, audio_in_storage=args.audio_in_storage)
    return kwargs


def _precheck(args: argparse.Namespace):
    def precheck() -> None:
        from megatron_ualm.data.codec import check_checkpoint_dir

        if args.codec == "xcodec":
            check_checkpoint_dir(args.codec_path, "X-Codec", model_type="xcodec")
    return precheck


def _tool_main(argv: Optional[Sequence[str]], prog: str, family: str, description: str, converter_class: str,
               add_args: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
               converter_kwargs: Callable[[argparse.Namespace], dict] = lambda args: {}) -> int:
    """One post-training data tool: the shared flags, the audio flags, then the runner.

    Args:
        argv: the command line (None: ``sys.argv``).
        prog: the program name.
        family: shard family and default ``--name``.
        description: ``--help`` text.
        converter_class: the converter's name in ``megatron_ualm.data`` (``chat.ChatConverter``).
        add_args: the tool's own flags.
        converter_kwargs: the tool's own converter arguments (may raise ``UsageError``).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, 1000)
    _add_audio_args(parser)
    add_args(parser)
    args = parser.parse_args(argv)
    _check_audio_args(parser, args)

    kwargs: dict = {}

    def converter() -> tuple:
        import importlib

        module, _, name = converter_class.rpartition(".")
        cls = getattr(importlib.import_module(f"megatron_ualm.data.{module}"), name)
        kwargs.update(tokenizer=args.tokenizer, **converter_kwargs(args), **_audio_kwargs(args))
        return cls, kwargs

    def encode_in_main() -> Optional[bool]:
        device = (kwargs.get("codec") or {}).get("device")
        return args.encode_in_main if args.encode_in_main is not None or device is None else device.startswith("cuda")

    return _run(args, family, converter, encode_in_main, _precheck(args))


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
    return _tool_main(
        argv, "preprocess_chat", "chat",
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
    return _tool_main(
        argv, "preprocess_preferences", "preference",
        "Turn a DPO preference manifest into paired UALM shards (the preference family). A record is "
        '{"prompt": "text" | [chat messages], "chosen": <response>, "rejected": <response>} where a '
        'response is text, one message ({"content"}, {"audio": path} or {"codes": [[...]]}) or a list '
        "of assistant messages (e.g. a caption, then audio); other fields (id, scores) are ignored. "
        "Records with a missing side, chosen identical to rejected, or missing / undecodable audio are "
        "named in rejected.jsonl and skipped (--strict stops at the first). Schema: "
        "megatron_ualm/data/preference.py.",
        "preference.PreferenceConverter")
