"""Progress bars on stderr: count, rate and ETA (tqdm), one look for every long-running tool."""

from __future__ import annotations

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
