"""One run per ``--save`` directory.

Two runs writing to the same directory write into the same ``iter_N.partial``, one dies, and
``metrics.jsonl`` interleaves their rows. The first global rank of a run therefore holds
``<save>/.ualm_run.lock`` (JSON: host, pid, Slurm job id, start time, command) for the whole
run, and refreshes its modification time every ``HEARTBEAT_S`` seconds. A second run is refused
with the owner's host and pid. The lock is taken over, with a warning, when its owner is dead:

- same host: the pid no longer exists;
- another host: the heartbeat is older than ``stale_after_s`` (the owner cannot be probed);
- the same Slurm job id (a requeued or restarted job): the previous incarnation is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Optional

from megatron_ualm.files import atomic_write

LOCK_NAME = ".ualm_run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunLockError(RuntimeError):
    """Another live run owns the directory."""


def _proc_stat(pid: int) -> Optional[tuple[str, str]]:
    """(state, start time in clock ticks) of a process from /proc, None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    """Whether the process that wrote a lock still runs: not gone, not a zombie (a killed run
    whose parent died is never reaped in some containers), and not a new process that reuses
    the pid (its start time differs)."""
    stat = _proc_stat(pid)
    if stat is None:
        if os.path.isdir("/proc/self"):
            return False
        try:  # no /proc (macOS): existence only
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, started = stat
    return state not in ("Z", "X") and (start is None or started == start)


def _owner_text(owner: dict) -> str:
    job = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"host {owner.get('host')} pid {owner.get('pid')}{job}, started {owner.get('started')}"


class RunLock:
    """The lock of one ``--save`` directory, held by this process.

    Args:
        directory: the ``--save`` directory (created if missing).
        stale_after_s: age of the heartbeat after which another host's lock counts as dead.
    """

    def __init__(self, directory: str, stale_after_s: float = STALE_AFTER_S):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.stale_after_s = stale_after_s
        stat = _proc_stat(os.getpid())
        self.me = dict(host=socket.gethostname(), pid=os.getpid(), pid_start=stat[1] if stat else None,
                       slurm_job_id=os.environ.get("SLURM_JOB_ID"), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                       command=" ".join(sys.argv))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _dead_reason(self, owner: dict) -> Optional[str]:
        """Why the recorded owner is no longer running, or None while it may be."""
        if owner.get("slurm_job_id") and owner.get("slurm_job_id") == self.me["slurm_job_id"]:
            return f"it belongs to this Slurm job ({owner['slurm_job_id']}), restarted"
        if owner.get("host") == self.me["host"]:
            return None if _pid_alive(int(owner.get("pid", -1)), owner.get("pid_start")) else "its process is gone"
        age = time.time() - os.path.getmtime(self.path)
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old"
        return None

    def acquire(self) -> "RunLock":
        """Takes the lock, or raises ``RunLockError`` naming the live owner."""
        os.makedirs(self.directory, exist_ok=True)
        blob = json.dumps(self.me)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(self.path) as f:
                    owner = json.load(f)
            except (OSError, json.JSONDecodeError):
                owner = {}
            reason = self._dead_reason(owner) if owner else "it is unreadable"
            if reason is None:
                raise RunLockError(
                    f"{self.directory} is in use by another run ({_owner_text(owner)}); two runs would overwrite "
                    f"each other's checkpoints and metrics. Choose another --save, or stop that run "
                    f"(a lock left by a dead run on another host is taken over after {self.stale_after_s:.0f} s)"
                ) from None
            print(f"[megatron_ualm] taking over the run lock of {self.directory} from {_owner_text(owner)}: "
                  f"{reason}", file=sys.stderr, flush=True)
            atomic_write(self.path, blob)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(blob)
        self._thread = threading.Thread(target=self._heartbeat, name="ualm-run-lock", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Removes the lock if this process still owns it."""
        self._stop.set()
        try:
            with open(self.path) as f:
                owner = json.load(f)
            if owner.get("pid") == self.me["pid"] and owner.get("host") == self.me["host"]:
                os.remove(self.path)
        except (OSError, json.JSONDecodeError):
            pass
