"""A one-node Slurm cluster on localhost, started by hand (no systemd), for tests and benchmarks.

Debian's ``slurm-wlm`` (``scripts/setup_slurm.sh`` installs it) runs munged, slurmctld and
slurmd as child processes of this module, each with its own files under one temporary
directory: the munge key and socket, ``slurm.conf``, controller state, slurmd spool, logs and
a job-completion log. Clients reach this cluster through ``SLURM_CONF`` (``cluster.env``), so
a machine's own Slurm, if any, is never touched. What the configuration needs and why:

- ``SlurmctldHost=<host>(127.0.0.1)`` and a ``NodeName`` with the sockets, cores and threads
  that ``slurmd -C`` reports (slurmd refuses to register with a mismatching layout);
- ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` (no cgroups needed);
- ``select/cons_tres`` with ``CR_Core_Memory`` and a ``DefMemPerCPU`` (without a default
  memory per CPU every job takes the whole node's memory and array tasks run one at a time);
- ``SchedulerParameters=batch_sched_delay=0`` (otherwise batch jobs start on a 3 s tick),
  ``MailProg=/bin/true``, accounting off (jobs are read with ``scontrol show job``).

Also a command line, to try the repository's sbatch files or run the Slurm benchmark by hand::

    python tests/slurm/localslurm.py            # prints 'export SLURM_CONF=...'; Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

from megatron_ualm.launch import free_port

SBIN_PATH = os.pathsep.join(["/usr/sbin", "/sbin", "/usr/local/sbin"])
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    """The cluster could not be started, or a Slurm command failed."""


def find_programs() -> dict[str, str]:
    """Paths of the Slurm and munge programs; raises naming the missing ones and the fix."""
    search = os.environ.get("PATH", "") + os.pathsep + SBIN_PATH
    found = {name: shutil.which(name, path=search) for name in PROGRAMS}
    missing = sorted(n for n, p in found.items() if p is None)
    if missing:
        raise SlurmError(f"Slurm is not installed here ({', '.join(missing)} not found): run "
                         "'bash scripts/setup_slurm.sh' (Debian's slurm-wlm + munge; needs root), or set "
                         "UALM_SKIP_SLURM=1 to skip the Slurm tests on a machine where that is impossible")
    return found


def stop_daemon(proc: Optional[subprocess.Popen], timeout: float = 15.0) -> None:
    """Stops a daemon we started: SIGTERM, SIGKILL after ``timeout`` seconds (nothing if it is gone)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _die_with_parent() -> None:
    """Runs in the child before exec: the daemon gets SIGTERM if the test process dies."""
    os.setsid()  # Ctrl-C in a terminal reaches pytest, which stops the cluster in order
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def node_layout(slurmd: str) -> dict[str, str]:
    """``slurmd -C``'s view of this machine: NodeName, CPUs, SocketsPerBoard, ..., RealMemory."""
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30)
    fields = dict(re.findall(r"(\w+)=(\S+)", out.stdout.splitlines()[0] if out.stdout else ""))
    needed = ("NodeName", "CPUs", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    if out.returncode or any(k not in fields for k in needed):
        raise SlurmError(f"'slurmd -C' did not describe this machine (exit {out.returncode}): "
                         f"{(out.stdout + out.stderr).strip()[:500]}")
    return fields


def write_config(root: str, layout: Mapping[str, str], user: str) -> str:
    """Writes ``<root>/slurm.conf`` for one node on localhost; returns its path."""
    sockets = int(layout.get("SocketsPerBoard", 1)) * int(layout.get("Boards", 1))
    cpus = int(layout["CPUs"])
    memory = int(layout["RealMemory"]) * 9 // 10  # slurmd drains a node that reports less than configured
    host = layout["NodeName"]
    lines = [
        "ClusterName=ualmtest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        f"DefMemPerCPU={max(memory // cpus, 1)}",
        "MailProg=/bin/true",
        "SchedulerParameters=batch_sched_delay=0",
        "ReturnToService=2",
        "KillWait=5",
        "MinJobAge=3600",  # finished jobs stay visible to scontrol for the whole session
        "MpiDefault=none",
        "SwitchType=switch/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root}/log/jobcomp.log",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Sockets={sockets} "
        f"CoresPerSocket={layout['CoresPerSocket']} ThreadsPerCore={layout['ThreadsPerCore']} "
        f"RealMemory={memory} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    path = os.path.join(root, "slurm.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def parse_records(text: str) -> list[dict[str, str]]:
    """``scontrol -o show ...`` output (one record a line) as dictionaries."""
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line.strip()]


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, their files under ``root``.

    Args:
        root: an empty directory for the cluster's files (default: a new one under /tmp;
            munged needs every directory above its socket to be searchable by all users).
        keep: leave ``root`` on disk after ``stop()`` (logs for debugging).
    """

    def __init__(self, root: Optional[str] = None, keep: bool = False):
        self.programs = find_programs()
        self.root = root or tempfile.mkdtemp(prefix="ualm-slurm-", dir="/tmp")
        self.keep = keep
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = ""
        self.node = ""

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Starts the daemons and waits until the node is idle; raises SlurmError with the logs."""
        os.chmod(self.root, 0o755)
        for d in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge"), 0o755)
        key = os.path.join(self.root, "munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        layout = node_layout(self.programs["slurmd"])
        self.node = layout["NodeName"]
        self.conf = write_config(self.root, layout, pwd.getpwuid(os.getuid()).pw_name)
        try:
            m = os.path.join(self.root, "munge")
            self._spawn("munged", ["-F", f"--socket={m}/munge.socket", f"--key-file={key}",
                                   f"--pid-file={m}/munged.pid", f"--log-file={self.root}/log/munged.log",
                                   f"--seed-file={m}/munged.seed"])
            self._wait(lambda: os.path.exists(f"{m}/munge.socket"), timeout, "munged to open its socket")
            self._spawn("slurmctld", ["-D", "-i", "-f", self.conf])
            self._spawn("slurmd", ["-D", "-f", self.conf])
            self._wait(lambda: self.node_state() == "idle", timeout, f"node {self.node} to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.stdout"), "w")
        self.procs[name] = subprocess.Popen([self.programs[name], *args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, preexec_fn=_die_with_parent)
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f} s"
                raise SlurmError(f"waiting for {what}: {why}\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Cancels every job of this cluster, then stops slurmd, slurmctld and munged by pid."""
        self.cancel_all(wait_s=30)
        for name in ("slurmd", "slurmctld", "munged"):
            stop_daemon(self.procs.pop(name, None))
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def cancel_all(self, wait_s: float) -> None:
        """Cancels every job while the controller runs; waits up to ``wait_s`` for the queue to empty."""
        if not (self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None):
            return
        try:
            jobs = self.run("squeue", "-h", "-o", "%F", check=False, timeout=15).split()
            if jobs:
                self.run("scancel", *sorted(set(jobs)), check=False, timeout=15)
                deadline = time.monotonic() + wait_s
                while (self.run("squeue", "-h", "-o", "%i", check=False, timeout=15).strip()
                       and time.monotonic() < deadline):
                    time.sleep(0.2)
        except (SlurmError, subprocess.TimeoutExpired):
            pass

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients ------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients and jobs: this cluster's SLURM_CONF, none of an
        enclosing Slurm job's variables, and the daemons' directories on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = self.conf
        env["PATH"] = env.get("PATH", "") + os.pathsep + SBIN_PATH
        return env

    def job_env(self, **extra: str) -> dict[str, str]:
        """``env`` for jobs that run this interpreter's tools: its bin directory first on PATH
        (``python``, ``torchrun``), one thread per process, no TorchDynamo on CPU, plus ``extra``."""
        env = self.env
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
        env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", **extra)
        return env

    def run(self, program: str, *args: str, check: bool = True, env: Optional[Mapping[str, str]] = None,
            cwd: Optional[str] = None, timeout: float = 60) -> str:
        """Runs a Slurm client; returns stdout, raises SlurmError with stderr on failure."""
        proc = subprocess.run([self.programs.get(program, program), *args], capture_output=True, text=True,
                              env=dict(env or self.env), cwd=cwd, timeout=timeout)
        if check and proc.returncode:
            raise SlurmError(f"{program} {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, script: str, *script_args: str, options: Sequence[str] = (),
               env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> str:
        """Submits ``script`` (sbatch ``options`` before it, ``script_args`` after); returns the job id."""
        out = self.run("sbatch", "--parsable", *options, script, *script_args, env=env, cwd=cwd)
        return out.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` records of a job, one per array task (pending tasks may share one)."""
        return parse_records(self.run("scontrol", "-o", "show", "job", job_id))

    def wait(self, job_id: str, timeout: float = 300, states: Sequence[str] = tuple(FINAL_STATES)) -> list[dict]:
        """Waits until every task of ``job_id`` is in one of ``states``; returns their records."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in states for r in records):
                return records
            if time.monotonic() > deadline:
                shown = ", ".join(f"{r.get('JobId')}:{r.get('JobState')}({r.get('Reason')})" for r in records)
                raise SlurmError(f"job {job_id} not {'/'.join(sorted(states))} after {timeout:.0f} s: {shown}")
            time.sleep(0.2)

    def node_state(self) -> str:
        proc = subprocess.run([self.programs["sinfo"], "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                              env=self.env, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of each daemon's log (for error messages)."""
        parts = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))) if os.path.isdir(self.root) else []:
            with open(os.path.join(self.root, "log", name), errors="replace") as f:
                tail = f.readlines()[-lines:]
            if tail:
                parts.append(f"--- {name}\n" + "".join(tail))
        return "\n".join(parts)


def job_output(path: str, limit: int = 6000) -> str:
    """The end of a job's output file (for error messages)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:]
    except FileNotFoundError:
        return f"(no output file {path})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a one-node Slurm cluster on localhost until Ctrl-C (or SIGTERM), for trying the "
                    "repository's sbatch files by hand. Needs Debian's slurm-wlm and munge "
                    "(bash scripts/setup_slurm.sh) and, to run jobs as other users, root.")
    parser.add_argument("--dir", help="empty directory for the cluster's files (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the directory (logs) after stopping")
    args = parser.parse_args(argv)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    return serve(lambda: SlurmCluster(os.path.abspath(args.dir) if args.dir else None, keep=args.keep),
                 lambda cluster: f"one-node Slurm up (node {cluster.node})", lambda cluster: cluster.procs.values())


def serve(make: Callable[[], SlurmCluster], banner: Callable[[SlurmCluster], str],
          daemons: Callable[[SlurmCluster], Iterable[subprocess.Popen]]) -> int:
    """Starts ``make()``'s cluster and keeps it up until Ctrl-C / SIGTERM (0) or a daemon exits (1)."""
    try:
        cluster = make().start()
    except SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    print(f"{banner(cluster)}; in another shell:\n  export SLURM_CONF={cluster.conf}", flush=True)
    try:
        while all(p.poll() is None for p in daemons(cluster)):
            time.sleep(1)
        print(f"a daemon exited:\n{cluster.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
