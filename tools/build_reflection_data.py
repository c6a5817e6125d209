"""Build UALM-Reason self-reflection SFT data (audio 1, its caption, a critic's critique, audio 2); run with --help."""

from megatron_ualm.posttraining.reflection import build_reflection_data_main

if __name__ == "__main__":
    raise SystemExit(build_reflection_data_main())
