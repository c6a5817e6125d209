"""Tiny local components for CPU runs, recipes and tests: no downloads, the real classes.

- ``corpus``: a tone-and-sentence corpus with a BPE tokenizer and a random tiny X-Codec, turned
  into shards and a blend by the real preprocessing tools (the quick start's data);
- ``backbones``: random checkpoints of the evaluation backbones (LAION-CLAP, OpenL3, PaSST,
  PANNs, AudioBox-Aesthetics) in the layouts their loaders read;
- ``critic``: a random two-layer ``Qwen2ForCausalLM`` with its tokenizer (the self-reflection
  critic of the recipes).

Random weights make scores meaningless; every stage still runs the real code path.
"""
