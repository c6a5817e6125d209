"""Turn SFT conversations (chat, UALM-Reason kinds) into chat shards; run with --help."""

from megatron_ualm.data.cli import preprocess_chat_main

if __name__ == "__main__":
    raise SystemExit(preprocess_chat_main())
