"""Where a process stands in a job: the launcher's variables (torchrun, Slurm wrappers), or a
world of one on a free local port when it was started by hand."""

from __future__ import annotations

import os
import socket
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
