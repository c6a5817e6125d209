"""Evaluation of UALM as the paper reports it (``python -m megatron_ualm.evaluate``).

- ``metrics``: the math, on arrays: ``frechet_distance``, ``kl_divergence``, ``inception_score``,
  ``clap_score`` (and ``embedding_statistics``, ``softmax``);
- ``backbones``: LAION-CLAP, OpenL3, PaSST, PANNs, AudioBox-Aesthetics from local weights;
- ``scorers``: per-clip scores behind one interface (``load_scorer("clap" | "aesthetics" | "pkg.mod:Class")``);
- ``tta``: text-to-audio metrics FD / KL / IS / CL / AES over a folder, reference statistics,
  the feature cache;
- ``understanding`` / ``text``: MMAU / MMAR accuracy, MMLU log-likelihood, GSM8K exact match;
- ``report``: results JSON, Markdown table (paper's column order), per-sample CSV;
- ``runner``: decoding batches of conversations on every model-parallel rank, first-token scores;
- ``during_training``: audio evaluation every N iterations of a training run (a training-loop
  extension). Tiny random backbone checkpoints for CPU runs are in ``megatron_ualm.tiny``.
"""

from megatron_ualm.evaluation.metrics import (clap_score, embedding_statistics, frechet_distance, inception_score,
                                              kl_divergence, softmax)

__all__ = ["clap_score", "embedding_statistics", "frechet_distance", "inception_score", "kl_divergence", "softmax"]
