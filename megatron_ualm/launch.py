"""Where a process stands in a job: the launcher's variables (torchrun, Slurm wrappers), or a
world of one on a free local port when it was started by hand; and the command that started it."""

from __future__ import annotations

import os
import socket
import sys
from typing import Mapping, Optional

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "SLURM_PROCID")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launched(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether a launcher set this process's rank and world (torchrun, srun wrappers)."""
    environ = os.environ if environ is None else environ
    return any(k in environ for k in LAUNCHER_VARIABLES)


def world_of_one() -> dict[str, str]:
    """The variables that make this process rank 0 of 1 on a free local port."""
    return dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))


def program_name() -> str:
    """The program as the user started it, for a command line's usage and error lines.

    ``ualm-generate`` for a console script, ``preprocess_text.py`` for a tool run by its path
    (argparse's own default in both cases), and ``python -m megatron_ualm.generate`` for a module,
    where argparse would say ``generate.py``.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # python -m package.module
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "megatron_ualm"
