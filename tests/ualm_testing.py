"""What tests share to start the package's programs in child processes: the torchrun command,
the environment, and a run that fails the test with the program's output."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Sequence

# A launcher's variables in the test process would make a child think it is a rank of that job.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun(nproc: int, *target: str) -> list[str]:
    """``torchrun --standalone --nproc-per-node N <target>`` with this interpreter
    (``target``: a script and its arguments, or ``-m module ...``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]


def child_env(**extra: str) -> dict:
    """The environment of a child program: one thread, no TorchDynamo, no launcher variables, and
    the once-per-run TE notice not yet marked as said (a test may look for it)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.pop("UALM_FALLBACK_NOTICE_SHOWN", None)
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def run_ok(cmd: Sequence[str], timeout: float = 900, env: Optional[dict] = None, cwd: Optional[str] = None) -> str:
    """Runs ``cmd`` to the end; fails the test with the ends of its output unless it exits 0.

    Returns:
        stdout and stderr, concatenated.
    """
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env or child_env(), cwd=cwd)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr
