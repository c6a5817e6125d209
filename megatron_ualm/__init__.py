"""UALM (unified audio language model) on Megatron-Core.

Entry points: ``python -m megatron_ualm.pretrain`` (and ``finetune``, ``dpo``, ``generate``,
``evaluate``, ``quickstart``); the tools in ``tools/``. Python API: ``megatron_ualm.api``
(``initialize_parallel``, ``build_model``, ``run_batch``, ``logits``),
``megatron_ualm.config.make_config``, ``megatron_ualm.inference``. The README's "Layout"
section gives the layers. Submodules are imported on demand so that the data tools start
without loading Megatron-Core, and importing the package changes nothing outside it (entry
points install the one-line warning summary of ``compat.quiet`` themselves).
"""

__version__ = "0.1.0"
