"""Reading the evaluation's record files: JSON Lines, or one JSON list (MMAU ships one)."""

from __future__ import annotations

import json


def read_records(path: str) -> list[tuple[int, object]]:
    """``(line or item number, record)`` pairs; a malformed line is a one-line error naming it.

    Args:
        path: a ``.jsonl`` file (blank lines skipped) or a file holding one JSON list.
    """
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    return out
