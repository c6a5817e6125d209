"""``python -m megatron_ualm.conversion --help``."""

from megatron_ualm.conversion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
