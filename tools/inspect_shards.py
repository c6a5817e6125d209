"""Print, summarise and validate UALM shards; run with --help."""

from megatron_ualm.data.cli import inspect_shards_main

if __name__ == "__main__":
    raise SystemExit(inspect_shards_main())
