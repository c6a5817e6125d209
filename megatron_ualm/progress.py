"""Progress bars on stderr: count, rate and ETA (tqdm), one look for every long-running tool."""

from __future__ import annotations

import contextlib
import sys


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar over ``total`` items named ``unit`` (``clip``, ``prompt``, ``question``...).

    Args:
        total: items in all.
        desc: the bar's label.
        unit: what one item is (the rate reads ``<unit>/s``).
        enabled: False hides it (other ranks, ``--no-progress``).
        initial: items already done (a resumed run).
    """
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


@contextlib.contextmanager
def library_bars_off():
    """Hides ``transformers``' own bars ("Loading weights", "Writing model shards") inside the
    block: a model loading or saving in a fraction of a second is not a task a person waits on,
    and a tool whose workers each load the codec would print one bar per worker. The setting is
    put back afterwards (bars a caller turned off stay off)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
