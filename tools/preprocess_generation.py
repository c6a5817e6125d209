"""Tokenise/encode generation records into UALM token shards; run with --help."""

from megatron_ualm.data.cli import preprocess_generation_main

if __name__ == "__main__":
    raise SystemExit(preprocess_generation_main())
