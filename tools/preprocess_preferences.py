"""Turn a DPO preference manifest (prompt, chosen, rejected) into paired shards; run with --help."""

from megatron_ualm.data.cli import preprocess_preferences_main

if __name__ == "__main__":
    raise SystemExit(preprocess_preferences_main())
