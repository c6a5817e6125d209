"""Reports: ``results.json``, a Markdown table in the paper's column order and a per-sample CSV.

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written report under the final name.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional, Sequence

from megatron_ualm.files import atomic_file, atomic_json, atomic_write

# The paper's text-to-audio columns, in its order (Table 8), then the extras this harness adds.
PAPER_COLUMNS = ("FD", "KL", "IS", "CL", "AES")
EXTRA_COLUMNS = ("FD_panns", "FD_clap", "AES_CE", "AES_CU", "AES_PC", "AES_PQ")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: dict[str, dict], columns: Optional[Sequence[str]] = None) -> str:
    """A Markdown table, one row per system.

    Args:
        rows: ``{system name: metrics}``.
        columns: metric columns; default: the paper's (FD, KL, IS, CL, AES), then any extras present.

    Returns:
        The table (``-`` marks a metric that was not computed).
    """
    if columns is None:
        present = {k for m in rows.values() for k in m}
        columns = list(PAPER_COLUMNS) + [c for c in EXTRA_COLUMNS if c in present]
    lines = ["| system | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_reports(out_dir: str, name: str, results: dict, rows: Sequence[dict], table_metrics: Optional[dict] = None,
                  columns: Optional[Sequence[str]] = None) -> dict[str, str]:
    """Writes ``results.json``, ``results.md`` and ``samples.csv`` into ``out_dir``.

    Args:
        out_dir: output folder.
        name: the system's name in the table.
        results: everything for the JSON (metrics, settings, notes).
        rows: per-sample dicts for the CSV (columns: the union of their keys, first-seen order).
        table_metrics: the metrics for the Markdown row (default ``results["metrics"]``).
        columns: Markdown columns (default: the paper's order).

    Returns:
        ``{"json": path, "markdown": path, "csv": path}``.
    """
    paths = {
        "json": atomic_json(os.path.join(out_dir, "results.json"), results, indent=2, default=float),
        "markdown": atomic_write(os.path.join(out_dir, "results.md"),
                                 markdown_table({name: table_metrics or results.get("metrics", {})}, columns)),
    }
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    paths["csv"] = os.path.join(out_dir, "samples.csv")
    with atomic_file(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return paths
