"""Loss curves from the metrics log that the pretraining entry point writes."""

from __future__ import annotations

import json
from typing import Sequence


def read_metrics(path: str) -> list[dict]:
    """Rows of ``metrics.jsonl``, one per logged iteration: rows of the same iteration are merged
    (training and in-training evaluation write separate rows), later values winning (a resumed
    run logs its iterations again)."""
    rows: dict[int, dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            rows.setdefault(int(row["iteration"]), {}).update(row)
    return [rows[i] for i in sorted(rows)]


def plot_metrics(path: str, out_png: str, keys: Sequence[str] | None = None) -> list[str]:
    """Writes a PNG of the loss curves in ``path``.

    Args:
        path: a ``metrics.jsonl`` written by ``megatron_ualm.pretrain``.
        out_png: where to write the figure.
        keys: losses to draw (default: every key ending in ``loss``).

    Returns:
        The keys drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path} has no logged iterations")
    keys = list(keys or sorted({k for r in rows for k in r if k.endswith("loss")}))
    fig, (ax_main, ax_codes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in keys:
        its = [r["iteration"] for r in rows if key in r]
        vals = [r[key] for r in rows if key in r]
        ax = ax_codes if key.startswith("codebook_") else ax_main
        ax.plot(its, vals, label=key, linewidth=1.2)
    for ax, title in ((ax_main, "total and text loss"), (ax_codes, "per-codebook loss")):
        ax.set_xlabel("iteration")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return keys
