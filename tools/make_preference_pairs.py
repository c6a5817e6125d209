"""Sample candidates with the model, score them, and write DPO pairs and the adaptation manifest; run with --help."""

from megatron_ualm.posttraining.pairs import make_preference_pairs_main

if __name__ == "__main__":
    raise SystemExit(make_preference_pairs_main())
