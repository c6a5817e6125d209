"""Works around a packaging bug of the megatron-core wheel; applies on GPU and CPU alike."""

from __future__ import annotations


def skip_helpers_compilation_when_shipped() -> None:
    """``initialize_megatron`` calls ``megatron.core.datasets.utils.compile_helpers()``, which
    runs ``make`` in a folder that the 0.19 wheel ships without a Makefile, and exits the job
    when that fails. The wheel already contains the compiled ``helpers_cpp``; when it imports,
    compilation is skipped. A source checkout without the extension still compiles."""
    from megatron.core.datasets import utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return
    utils.compile_helpers = lambda: None
