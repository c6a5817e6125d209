"""Work-arounds for megatron-core 0.19 bugs that hit GPU and CPU runs alike.

``apply()`` installs all of them; each function names the bug it works around.
"""

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


def load_distributed_optimizer_states_without_autograd() -> None:
    """``DistributedOptimizer._set_main_param_and_optimizer_states`` copies loaded values into
    the main parameters with ``copy_``. Without a separate fp32 master copy (fp32 training) the
    main parameter is a view of a model parameter that requires grad, and the in-place copy
    fails with "a view of a leaf Variable that requires grad is being used in an in-place
    operation" when resuming with ``--use-distributed-optimizer``. Loading is not part of any
    graph: run it under ``no_grad``."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_ualm_no_grad", False):
        return

    def set_states(self, *args, **kwargs):
        with torch.no_grad():
            return original(self, *args, **kwargs)

    set_states._ualm_no_grad = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def escape_percent_in_docstring_help() -> None:
    """``ArgumentGroupFactory`` turns config-field docstrings into argparse help texts, and
    argparse %-formats every help text when printing ``--help``. A docstring with a bare ``%``
    (0.19: ``--moe-paged-stash-buffer-size-factor-cuda``, "1.10 = 10%") makes ``--help`` die
    with "unsupported format character". Docstrings are prose, not format strings: escape them."""
    from megatron.training.argument_utils import ArgumentGroupFactory

    original = ArgumentGroupFactory._build_argparse_kwargs_from_field
    if getattr(original, "_ualm_escaped", False):
        return

    def build(self, attribute):
        kwargs = original(self, attribute)
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = kwargs["help"].replace("%", "%%")
        return kwargs

    build._ualm_escaped = True
    ArgumentGroupFactory._build_argparse_kwargs_from_field = build


def _writer_manager_init(parent: int) -> None:
    """Runs in Megatron's checkpoint-writer manager: SIGTERM is the training rank's to handle, and
    the manager ends when that rank is gone (a SIGKILLed rank would otherwise leave it behind)."""
    import os
    import signal
    import threading
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def follow_parent() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(0)

    threading.Thread(target=follow_parent, name="ualm-follow-parent", daemon=True).start()


def checkpoint_writer_survives_sigterm() -> None:
    """Megatron's file-system checkpoint writer collects its results through a multiprocessing
    ``Manager`` process created at the first save and kept for the run. Slurm (a requeue, a time
    limit) sends SIGTERM to every process of the job, that manager included: it dies, and the
    very save ``--exit-signal-handler`` is there to make fails with ``EOFError`` (the run then
    also hangs at exit). The manager is started here with SIGTERM ignored; it still stops when
    the run ends (the manager's finalizer sends it a shutdown message, then SIGKILL if needed),
    and by itself when the rank is killed (it watches its parent)."""
    import os
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fs

    original = fs.get_write_results_queue
    if getattr(original, "_ualm_sigterm", False):
        return

    def get_write_results_queue(mp_mode: str = "spawn"):
        if fs._results_queue is None:
            manager = SyncManager(ctx=fs.mp.get_context(mp_mode))
            manager.start(initializer=_writer_manager_init, initargs=(os.getpid(),))
            get_write_results_queue.manager = manager  # keeps the manager (and its process) alive
            fs._results_queue = manager.Queue()
        return fs._results_queue

    get_write_results_queue._ualm_sigterm = True
    fs.get_write_results_queue = get_write_results_queue


def apply() -> None:
    """Installs every fix in this module."""
    skip_helpers_compilation_when_shipped()
    load_distributed_optimizer_states_without_autograd()
    escape_percent_in_docstring_help()
    checkpoint_writer_survives_sigterm()
