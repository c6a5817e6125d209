"""UALM (unified audio language model) on Megatron-Core.

Entry points: ``python -m megatron_ualm.pretrain``, ``python -m megatron_ualm.generate``,
``python -m megatron_ualm.quickstart``; the tools in ``tools/``. Python API:
``megatron_ualm.api`` (``initialize_parallel``, ``build_model``, ``run_batch``, ``logits``),
``megatron_ualm.config.make_config``, ``megatron_ualm.inference``. Submodules are imported on
demand so that the data tools start without loading Megatron-Core.
"""

from megatron_ualm.compat import quiet as _quiet

_quiet.install()

__version__ = "0.1.0"
