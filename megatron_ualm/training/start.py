"""How a training entry point starts: the warning summary first, then Megatron's loop.

This module imports nothing heavy, so that ``pretrain`` / ``finetune`` / ``dpo`` can install
``compat.quiet`` before Megatron-Core (and its import-time fallback warnings) is loaded.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence


def run_entry(make_entry: Callable[[], object], argv: Optional[Sequence[str]] = None) -> None:
    """Runs the ``TrainingEntry`` that ``make_entry()`` builds on Megatron's loop (``loop.run``).

    ``make_entry`` is called after the warning summary is on: it may import Megatron.
    """
    from megatron_ualm.compat import quiet

    quiet.install()  # before Megatron-Core is imported: its fallback warnings become one line
    from megatron_ualm.training import loop

    loop.run(make_entry(), argv)
