"""Builds the CPU quick-start corpus with the real tools, ready for ``megatron_ualm.pretrain``
(``megatron_ualm.tiny.corpus``: BPE tokenizer, tiny random X-Codec, synthesised tone clips,
token shards of the three families and their blend)::

    python -m megatron_ualm.quickstart --workdir runs/quickstart
    python -m megatron_ualm.pretrain --flavor debug --blend-file runs/quickstart/blend.json ...
"""

from __future__ import annotations

import argparse

from megatron_ualm.launch import program_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=program_name(), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/quickstart", help="where corpus, shards and blend go")
    parser.add_argument("--num-text", type=int, default=600, help="text records")
    parser.add_argument("--num-clips", type=int, default=160, help="audio clips (generation and understanding)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing worker processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from megatron_ualm.compat import quiet
    from megatron_ualm.tiny.corpus import build

    quiet.install()
    try:
        paths = build(args.workdir, args.num_text, args.num_clips, args.workers, args.seed)
    except RuntimeError as err:
        raise SystemExit(f"quickstart: {err}") from None
    print(f"quickstart corpus ready: blend file {paths['blend']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
