"""A Slurm cluster of several nodes on one machine, for the multi-node tests (needs root).

Each node is a Linux network namespace with its own address and host name; what runs there
(slurmd, the job steps, every rank) sees only that node's network. Built here, with nothing of
the machine's own configuration touched:

- in the root namespace: a bridge with a private /24 chosen for this cluster (the bridge holds
  ``.1``), munged with its own key and socket, slurmctld listening on ``.1``, and every client
  command (sbatch, scontrol, ...);
- per node ``nodeK``: a namespace joined to the bridge by a veth pair (address ``.K+1``, no
  default route) and one ``slurmd -N nodeK`` in it, started as

      nsenter --net=/run/netns/NS -- unshare --uts --mount --propagation private -- \\
          sh -c 'hostname nodeK; mount --bind HOSTS /etc/hosts; exec slurmd -D -f CONF -N nodeK'

  so the node has its own host name and a hosts file naming every node (the machine's
  /etc/hosts is never written, only hidden inside that mount namespace). ``ip netns exec``
  cannot be used: it remounts /sys, and slurmd 22.05 then exits ("No filesystem mounted on
  /sys/fs/cgroup"). With a shared host name gloo would bind 127.0.0.1 and the rendezvous fail.

Names (bridge, veths, namespaces) carry this process's pid and the cluster's number, ports are
free ones and files live under one temporary directory, so several clusters (and the one-node
cluster of ``localslurm``) run side by side. ``stop()`` cancels the jobs, kills every process
left in the nodes' namespaces (a job's orphans included), stops the daemons by pid and deletes
the namespaces and links. A stopped daemon may stay a zombie (the sandbox's pid 1 does not reap
orphans): zombies count as dead.

The Slurm settings that node loss relies on (``write_config``): ``SlurmdTimeout`` (a node that
stops answering is DOWN after it, and its jobs are requeued), ``ReturnToService=2`` (a node
that registers again is usable at once), and ``cred_expire=90`` in ``AuthInfo``. A requeued job
becomes eligible ``cred_expire`` + 1 s after the requeue, while slurmctld retries the old
incarnation's signals to the lost node every 60 s until it answers; with ``cred_expire=30`` such
a late signal hit the requeued job (same job and step ids) and failed it (``wait_delivered``).

Also a command line, to try the sbatch files across nodes by hand::

    python tests/slurm/multinode.py --nodes 2   # prints 'export SLURM_CONF=...'; Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Iterable, Optional

from megatron_ualm.launch import free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from localslurm import SBIN_PATH, SlurmCluster, SlurmError, _die_with_parent, node_layout, serve, stop_daemon  # noqa: E402

NAME_PREFIX = "ualm"  # bridge, veths and namespaces: ualm<pid>x<n>..., at most 15 characters
_COUNTER = itertools.count()
SLURMD_TIMEOUT = 10  # seconds without an answer before a node is DOWN (and its jobs requeued)


def _ip(*args: str, netns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *args] if netns is None else ["nsenter", f"--net=/run/netns/{netns}", "ip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise SlurmError(f"'{' '.join(cmd)}' failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _used_networks() -> list:
    out = _ip("-4", "route", "show", "table", "all", check=False).stdout + _ip("-4", "addr", check=False).stdout
    nets = []
    for text in re.findall(r"(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", out):
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            pass
    return nets


def pick_subnet(seed: int) -> ipaddress.IPv4Network:
    """A private /24 that no route or address of this machine overlaps (10.64.0.0 - 10.127.255.0),
    starting from one derived from ``seed`` so that concurrent clusters rarely try the same one."""
    used = [n for n in _used_networks() if n.prefixlen > 0]
    for i in range(16384):
        k = (seed + i) % 16384
        net = ipaddress.ip_network(f"10.{64 + k // 256}.{k % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise SlurmError("no free private /24 in 10.64.0.0/10 for the cluster's bridge")


def netns_inode(name: str) -> Optional[int]:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(name: str) -> list[int]:
    """Live processes whose network namespace is ``name`` (zombies have none and are skipped)."""
    inode = netns_inode(name)
    if inode is None:
        return []
    want = f"net:[{inode}]"
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == want:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` (``R``, ``S``, ``T`` stopped, ``Z`` zombie), '' if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def is_alive(pid: int) -> bool:
    return process_state(pid) not in ("", "Z", "X")


def kill_all(pids_of, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Sends ``sig`` to every pid ``pids_of()`` lists until none is alive (forks race the loop)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids_of() if is_alive(p)]
        if not alive or time.monotonic() > deadline:
            return
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _remove_leftovers() -> None:
    """Deletes namespaces and links of this module whose creating process is gone (a test
    process killed before it could clean up). Names carry that pid; live owners are left alone."""
    def dead_owner(name: str) -> bool:
        m = re.fullmatch(rf"{NAME_PREFIX}(\d+)[a-z]\d+.*", name)
        return bool(m) and not is_alive(int(m.group(1)))

    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    for ns in names:
        if dead_owner(ns):
            kill_all(lambda ns=ns: pids_in_netns(ns), timeout=5)
            _ip("netns", "delete", ns, check=False)
    for link in re.findall(r"^\d+: ([^:@]+)", _ip("-o", "link", check=False).stdout, re.M):
        if dead_owner(link):
            _ip("link", "delete", link, check=False)


class MultiNodeCluster(SlurmCluster):
    """munged + slurmctld in the root namespace, one slurmd per node namespace.

    Args:
        nodes: how many nodes (``node1`` .. ``nodeN``).
        partitions: ``{name: [node, ...]}``, the first the default (default: one partition
            ``debug`` of every node). Jobs in different partitions never share a node, so a
            node of one can be killed while the other runs jobs.
        cpus: CPUs each node declares (default: the machine's). More than the machine has
            lets jobs share it (``SlurmdParameters=config_overrides``).
        root: an empty directory for the cluster's files (default: a new one under /tmp).
        keep: leave ``root`` on disk after ``stop()`` (logs for debugging).
    """

    def __init__(self, nodes: int = 2, partitions: Optional[dict] = None, cpus: Optional[int] = None,
                 root: Optional[str] = None, keep: bool = False):
        super().__init__(root, keep)
        for tool in ("ip", "nsenter", "unshare"):
            if shutil.which(tool, path=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH) is None:
                raise SlurmError(f"{tool} is not installed (iproute2 / util-linux), which the multi-node cluster "
                                 "needs: run 'bash scripts/setup_slurm.sh', or set UALM_SKIP_SLURM=1 to skip the "
                                 "Slurm tests")
        self.tag = f"{NAME_PREFIX}{os.getpid()}{'abcdefghij'[next(_COUNTER) % 10]}"
        self.nodes = [f"node{k}" for k in range(1, nodes + 1)]
        self.partitions = partitions or {"debug": self.nodes}
        unknown = sorted(set(n for ns in self.partitions.values() for n in ns) - set(self.nodes))
        if unknown:
            raise ValueError(f"partitions name nodes {unknown} beyond node1..node{nodes}")
        self.cpus = cpus
        self.bridge = f"{self.tag}0b"
        self.netns = {n: f"{self.tag}{k}n" for k, n in enumerate(self.nodes, 1)}
        self.veth = {n: f"{self.tag}{k}v" for k, n in enumerate(self.nodes, 1)}
        self.subnet = None
        self.address: dict[str, str] = {}
        self.node_procs: dict[str, subprocess.Popen] = {}
        self._created: list[tuple[str, str]] = []  # ("netns" | "link", name), deleted by stop()

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "MultiNodeCluster":
        """Builds the network, starts the daemons, waits until every node is idle; raises
        SlurmError with the reason (and the daemons' logs) otherwise."""
        if os.geteuid() != 0:
            raise SlurmError("the multi-node cluster needs root (network namespaces, a bridge); run the tests as "
                             "root, or set UALM_SKIP_SLURM=1 to skip the Slurm tests on this machine")
        try:
            _remove_leftovers()
            self._network()
            os.chmod(self.root, 0o755)
            for d in ("munge", "state", "spool", "log", "run", "tmp"):
                os.makedirs(os.path.join(self.root, d), exist_ok=True)
            os.chmod(os.path.join(self.root, "munge"), 0o755)
            key = os.path.join(self.root, "munge", "munge.key")
            with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(os.urandom(1024))
            self.hosts_file = os.path.join(self.root, "hosts")
            with open(self.hosts_file, "w") as f:
                f.write("127.0.0.1 localhost\n" + f"{self.controller_address} {socket.gethostname()}\n"
                        + "".join(f"{a} {n}\n" for n, a in self.address.items()))
            self.conf = self.write_config(node_layout(self.programs["slurmd"]))
            m = os.path.join(self.root, "munge")
            self._spawn("munged", ["-F", f"--socket={m}/munge.socket", f"--key-file={key}",
                                   f"--pid-file={m}/munged.pid", f"--log-file={self.root}/log/munged.log",
                                   f"--seed-file={m}/munged.seed"])
            self._wait(lambda: os.path.exists(f"{m}/munge.socket"), timeout, "munged to open its socket")
            self._spawn("slurmctld", ["-D", "-i", "-f", self.conf])
            for node in self.nodes:
                self.start_node(node)
            self._wait(lambda: all(s == "idle" for s in self.node_states().values()) and
                       len(self.node_states()) == len(self.nodes), timeout, "every node to become idle")
        except BaseException:
            self.stop()
            raise
        self.node = self.nodes[0]
        return self

    def job_env(self, **extra: str) -> dict[str, str]:
        """``SlurmCluster.job_env`` with this cluster's own TMPDIR (``<root>/tmp``), where the
        tasks make their temporary directories (examples/slurm/launch.sh)."""
        return super().job_env(**{"TMPDIR": os.path.join(self.root, "tmp"), **extra})

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in [*self.procs.items(), *self.node_procs.items()] if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f} s"
                raise SlurmError(f"waiting for {what}: {why}\n{self.log_tail()}")
            time.sleep(0.1)

    @property
    def controller_address(self) -> str:
        return str(self.subnet.network_address + 1)

    def _network(self) -> None:
        self.subnet = pick_subnet(os.getpid() * 7 + next(_COUNTER))
        prefix = self.subnet.prefixlen
        self._created.append(("link", self.bridge))
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.controller_address}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for k, node in enumerate(self.nodes, 2):
            ns, host_end, node_end = self.netns[node], self.veth[node], self.veth[node] + "p"
            self._created.append(("netns", ns))
            _ip("netns", "add", ns)
            self._created.append(("link", host_end))
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("link", "set", node_end, "netns", ns)
            self.address[node] = str(self.subnet.network_address + k)
            _ip("addr", "add", f"{self.address[node]}/{prefix}", "dev", node_end, netns=ns)
            _ip("link", "set", node_end, "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)

    def write_config(self, layout: dict) -> str:
        """``<root>/slurm.conf`` for the nodes on the bridge; returns its path."""
        real_cpus = int(layout["CPUs"])
        cpus = self.cpus or real_cpus
        memory = int(layout["RealMemory"]) * 9 // 10 // len(self.nodes)  # the nodes share the machine's memory
        sockets = int(layout.get("SocketsPerBoard", 1)) * int(layout.get("Boards", 1))
        user = pwd.getpwuid(os.getuid()).pw_name
        lines = [
            f"ClusterName=ualm{len(self.nodes)}n",
            f"SlurmctldHost={socket.gethostname()}({self.controller_address})",
            f"SlurmctldPort={free_port("")}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire=90: see the module docstring (a shorter one failed requeued jobs).
            f"AuthInfo=socket={self.root}/munge/munge.socket,cred_expire=90",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/run/slurmctld.pid",
            f"SlurmdPidFile={self.root}/run/slurmd-%n.pid",  # one per node: slurmd stops the pid it finds there
            f"SlurmctldLogFile={self.root}/log/slurmctld.log",
            f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={max(memory // cpus, 1)}",
            "MailProg=/bin/true",
            # Jobs start at once, and a requeued job is reconsidered every 5 s.
            "SchedulerParameters=batch_sched_delay=0,bf_interval=5,sched_interval=5",
            f"SlurmdTimeout={SLURMD_TIMEOUT}",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=3600",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.root}/log/jobcomp.log",
        ]
        if cpus != real_cpus:
            lines.append("SlurmdParameters=config_overrides")  # nodes declare more CPUs than the machine has
            layout_fields = f"CPUs={cpus}"
        else:
            layout_fields = (f"CPUs={cpus} Sockets={sockets} CoresPerSocket={layout['CoresPerSocket']} "
                             f"ThreadsPerCore={layout['ThreadsPerCore']}")
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeAddr={self.address[node]} NodeHostname={node} Port={free_port("")} "
                         f"{layout_fields} RealMemory={memory} State=UNKNOWN")
        for k, (name, members) in enumerate(self.partitions.items()):
            lines.append(f"PartitionName={name} Nodes={','.join(members)} Default={'YES' if k == 0 else 'NO'} "
                         "MaxTime=INFINITE State=UP")
        path = os.path.join(self.root, "slurm.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start_node(self, node: str) -> None:
        """Starts ``node``'s slurmd in its namespace (again, after ``kill_node``)."""
        ns = self.netns[node]
        script = (f"hostname {node} && mount --bind {self.hosts_file} /etc/hosts && "
                  f"exec {self.programs['slurmd']} -D -f {self.conf} -N {node}")
        log = open(os.path.join(self.root, "log", f"slurmd-{node}.stdout"), "a")
        self.node_procs[node] = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", "--", "unshare", "--uts", "--mount", "--propagation", "private",
             "--", "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, preexec_fn=_die_with_parent)
        log.close()

    def kill_node(self, node: str) -> float:
        """A node failure: SIGKILL to ``node``'s slurmd and every process in its namespace (job
        steps, ranks, data workers). Returns the time it happened (``time.monotonic()``)."""
        t = time.monotonic()
        kill_all(lambda: pids_in_netns(self.netns[node]))
        proc = self.node_procs.pop(node, None)
        if proc is not None:
            proc.poll()
        return t

    def stop(self) -> None:
        """Cancels every job, kills what is left on the nodes, stops the daemons by pid, deletes
        the namespaces and links (also after a failed or partial start)."""
        self.cancel_all(wait_s=20)
        for node in list(self.node_procs):
            stop_daemon(self.node_procs.pop(node), timeout=10)
        for kind, name in self._created:
            if kind == "netns":
                kill_all(lambda name=name: pids_in_netns(name))
        for name in ("slurmctld", "munged"):
            stop_daemon(self.procs.pop(name, None))
        for kind, name in reversed(self._created):
            if kind == "netns":
                _ip("netns", "delete", name, check=False)
            elif _ip("link", "show", name, check=False).returncode == 0:
                _ip("link", "delete", name, check=False)
        self._created.clear()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- state --------------------------------------------------------------------------------
    def node_states(self) -> dict[str, str]:
        """``{node: state}`` as sinfo reports it (``idle``, ``allocated``, ``down*``, ...)."""
        proc = subprocess.run([self.programs["sinfo"], "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                              env=self.env, timeout=30)
        if proc.returncode:
            return {}
        return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)

    def node_state(self) -> str:
        return " ".join(sorted(set(self.node_states().values())))

    def pids_on(self, node: str) -> list[int]:
        """Live processes on ``node`` (in its network namespace)."""
        return pids_in_netns(self.netns[node])

    def job_processes(self, node: str, job: str) -> list[int]:
        """Live processes of Slurm job ``job`` on ``node``."""
        return [p for p in self.pids_on(node) if environment_of(p).get("SLURM_JOB_ID") == job]

    def ranks(self, node: str, job: str) -> list[int]:
        """The training ranks of ``job`` on ``node``: children of its launchers with a ``RANK``
        (an orphaned data-loader worker has one too, but no launcher parent)."""
        launchers = set(self.launchers(node, job))
        return [p for p in self.job_processes(node, job) if "RANK" in environment_of(p) and parent_of(p) in launchers]

    def launchers(self, node: str, job: str) -> list[int]:
        """The launchers (torchrun, ft_launcher) of ``job`` on ``node``."""
        return [p for p in self.job_processes(node, job)
                if any(name in _cmdline(p) for name in (b"torch.distributed.run", b"fault_tolerance.launcher",
                                                        b"torchrun", b"ft_launcher"))]

    def loader_workers(self, node: str, job: str) -> list[int]:
        """The data-loader workers of ``job``'s ranks on ``node``: forks of a rank (same command
        line), unlike the rank's spawned helpers (checkpoint writer, resource tracker)."""
        ranks = set(self.ranks(node, job))
        return [p for p in self.job_processes(node, job)
                if parent_of(p) in ranks and _cmdline(p) == _cmdline(parent_of(p))]

    def steps_launched(self, node: str, job: str) -> int:
        """How many times ``node``'s slurmd launched step 0 of ``job`` (once per incarnation
        that ran there), from its log."""
        try:
            with open(os.path.join(self.root, "log", f"slurmd-{node}.log"), errors="replace") as f:
                return sum(f"launch task StepId={job}.0 " in line for line in f)
        except FileNotFoundError:
            return 0

    def wait_delivered(self, timeout: float = 150.0) -> None:
        """Waits until every node is up and slurmctld has no RPC left to deliver (``sdiag``).

        After a node loss, srun's and slurmctld's signals to the old incarnation's tasks on the
        lost node stay queued, retried every 60 s until the node answers again. A requeued job
        that starts on that node before they are delivered is killed by them (same job and
        step ids): Slurm makes a requeued job wait ``cred_expire`` + 1 s for that reason, and a
        test that starts it earlier must wait for the queue to drain instead.
        """
        def settled() -> bool:
            states = self.node_states()
            return (len(states) == len(self.nodes) and all(s in ("idle", "mixed", "allocated") for s in states.values())
                    and "No pending RPCs" in self.run("sdiag", check=False))

        self._wait(settled, timeout, "every node up and no RPC pending in slurmctld")


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def hang_up_orphan(pid: int) -> bool:
    """What Linux does to a stopped process whose process group is orphaned (its parent, here a
    rank that was killed, is gone): SIGHUP, then SIGCONT, so that it ends. gVisor, which this
    sandbox runs on, does not; the test does it instead, else the stopped process (a data-loader
    worker) keeps its job step's output pipe open and slurmstepd waits 60 s for it ("Abandoning
    IO 60 secs after job shutdown initiated"). Returns whether ``pid`` was such a process."""
    if process_state(pid) != "T" or is_alive(parent_of(pid)) and parent_of(pid) != 1:
        return False
    os.kill(pid, signal.SIGHUP)
    os.kill(pid, signal.SIGCONT)
    return True


def environment_of(pid: int) -> dict[str, str]:
    """A process's environment (``RANK``, ``SLURM_JOB_ID``, ...); empty if it is gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items: Iterable[bytes] = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a Slurm cluster of several nodes (network namespaces on a bridge) on this machine until "
                    "Ctrl-C, to try the repository's sbatch files across nodes by hand. Needs root and Debian's "
                    "slurm-wlm + munge (bash scripts/setup_slurm.sh).")
    parser.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    parser.add_argument("--cpus", type=int, help="CPUs each node declares (default: the machine's)")
    parser.add_argument("--dir", help="empty directory for the cluster's files (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the directory (logs) after stopping")
    args = parser.parse_args(argv)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    return serve(lambda: MultiNodeCluster(args.nodes, cpus=args.cpus, keep=args.keep,
                                          root=os.path.abspath(args.dir) if args.dir else None),
                 lambda cluster: f"{len(cluster.nodes)} nodes up "
                                 f"({', '.join(f'{n} {a}' for n, a in cluster.address.items())})",
                 lambda cluster: [*cluster.procs.values(), *cluster.node_procs.values()])

if __name__ == "__main__":
    sys.exit(main())
