"""Checkpoint conversion between Hugging Face (Qwen2.5, audio encoders) and UALM Megatron.

``import_hf`` and ``export_hf`` are the entry points; ``tools/convert_checkpoint.py`` and
``python -m megatron_ualm.conversion`` wrap them on the command line.
"""

from megatron_ualm.conversion.hf_io import ConversionError

__all__ = ["ConversionError", "export_hf", "import_hf"]


def __getattr__(name):
    # Lazy: importing the package must not pull in Megatron (the CLI parses --help without it).
    if name == "import_hf":
        from megatron_ualm.conversion.importer import import_hf

        return import_hf
    if name == "export_hf":
        from megatron_ualm.conversion.exporter import export_hf

        return export_hf
    raise AttributeError(name)
