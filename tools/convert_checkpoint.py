"""Convert Hugging Face Qwen2.5 (+ audio encoder) checkpoints to UALM Megatron checkpoints and back; run with --help."""

from megatron_ualm.conversion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
