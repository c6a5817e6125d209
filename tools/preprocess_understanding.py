"""Tokenise/encode understanding records into UALM token shards; run with --help."""

from megatron_ualm.data.cli import preprocess_understanding_main

if __name__ == "__main__":
    raise SystemExit(preprocess_understanding_main())
