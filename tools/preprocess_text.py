"""Tokenise/encode text records into UALM token shards; run with --help."""

from megatron_ualm.data.cli import preprocess_text_main

if __name__ == "__main__":
    raise SystemExit(preprocess_text_main())
