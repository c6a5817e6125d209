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
    """Writes a PNG of a run's curves in ``path``: for LM training (pretrain, finetune) the total
    and text losses beside the per-codebook losses; for DPO what it logs, the losses, the reward
    accuracy and margin, and the chosen / rejected log-probabilities of each stream.

    Args:
        path: a ``metrics.jsonl`` written by a training entry point.
        out_png: where to write the figure.
        keys: the curves to draw (default: every loss, or DPO's metrics).

    Returns:
        The keys drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path} has no logged iterations")
    present = {k for r in rows for k in r}
    if "dpo loss" in present:
        panels = _dpo_panels(rows, present)
    else:
        panels = [("total and text loss", "cross-entropy (nats)",
                   sorted(k for k in present if k.endswith("loss") and not k.startswith("codebook_"))),
                  ("per-codebook loss", "cross-entropy (nats)", sorted(k for k in present if k.startswith("codebook_")
                                                                       and k.endswith("loss")))]
    if keys:
        panels = [(title, unit, [k for k in keys if k in drawn]) for title, unit, drawn in panels]
        panels[0][2].extend(k for k in keys if not any(k in drawn for _, _, drawn in panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    drawn = []
    for ax, (title, unit, names) in zip(axes, panels):
        for key in names:
            its = [r["iteration"] for r in rows if key in r]
            ax.plot(its, [r[key] for r in rows if key in r], label=key, linewidth=1.2)
            drawn.append(key)
        ax.set_xlabel("iteration")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return drawn


def _dpo_panels(rows: list[dict], present: set) -> list[tuple[str, str, list[str]]]:
    """DPO's panels: losses; reward accuracy and margin; per-stream log-probs (streams that never
    had a supervised cell, e.g. codebooks of text-only pairs, are left out)."""
    def nonzero(k: str) -> bool:
        return any(r.get(k) for r in rows)

    logps = sorted(k for k in present if k.endswith("logp") and nonzero(k))
    return [("DPO loss", "nats", [k for k in ("loss", "dpo loss", "sft loss") if k in present]),
            ("rewards", "accuracy / margin", [k for k in ("reward accuracy", "reward margin") if k in present]),
            ("chosen and rejected log-probabilities", "log p (nats, summed per response)", logps)]
