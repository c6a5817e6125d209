"""Write the pretraining blend from shard sidecars and print the mixture table; run with --help."""

from megatron_ualm.data.cli import build_blend_main

if __name__ == "__main__":
    raise SystemExit(build_blend_main())
