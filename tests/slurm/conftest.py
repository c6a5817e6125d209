"""Real Slurm clusters for the tests in this directory (session scope).

``slurm``: one node (``localslurm.SlurmCluster``: munged, slurmctld and slurmd on localhost,
started by hand, files under a temporary directory). ``slurm_nodes``: two nodes on this machine
(``multinode.MultiNodeCluster``: a network namespace per node on a bridge of its own, one slurmd
in each; needs root). Each is started once, when the first test needs it, and stopped at the
end of the session, failures included: every job is cancelled, the daemons are stopped by their
pids (they also die with the test process if it is killed), and the two-node cluster kills
what is left in its namespaces and deletes them and its links.

A machine that cannot run Slurm makes these tests fail with the reason (CI installs Slurm with
``scripts/setup_slurm.sh`` from ``scripts/run_tests.sh``). On a developer machine without root,
``UALM_SKIP_SLURM=1`` skips them instead, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from jobs import Reference  # noqa: E402
from localslurm import SlurmCluster, SlurmError  # noqa: E402
from multinode import MultiNodeCluster  # noqa: E402

# The tiny corpora of the data tests (tokenizer, random X-Codec, audio clips and manifests),
# shared through their fixed directories (as tests/tools does).
_fixtures = sys.modules.get("ualm_data_test_fixtures")  # tests/tools may have loaded it already
if _fixtures is None:
    _path = pathlib.Path(__file__).resolve().parents[1] / "data" / "conftest.py"
    _spec = importlib.util.spec_from_file_location("ualm_data_test_fixtures", _path)
    _fixtures = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_fixtures)
globals().update({k: v for k, v in vars(_fixtures).items() if not k.startswith("_") and k not in globals()})

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP_VARIABLE = "UALM_SKIP_SLURM"
_START = {"seconds": None}  # how long the cluster took to start (reported by root conftest.py)


def _started(make, what: str):
    """``make().start()``; a skip with UALM_SKIP_SLURM=1, else a failure naming the reason."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: the Slurm tests are skipped on this machine")
    problem = None
    try:
        return make().start()
    except SlurmError as err:
        problem = str(err)
    pytest.fail(f"cannot start the {what}: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def slurm():
    """The running one-node cluster; fails (never skips, unless UALM_SKIP_SLURM=1) when it cannot start."""
    t0 = time.monotonic()
    cluster = _started(SlurmCluster, "one-node Slurm cluster")
    _START["seconds"] = time.monotonic() - t0
    try:
        yield cluster
    finally:
        cluster.stop()


# Two pairs of nodes: the default partition for the multi-node jobs, and one of its own for the
# node-loss job, so that killing its node does not touch the jobs running meanwhile.
NODE_PARTITIONS = {"main": ["node1", "node2"], "nodeloss": ["node3", "node4"]}


@pytest.fixture(scope="session")
def slurm_nodes():
    """The running multi-node cluster (``NODE_PARTITIONS``); fails like ``slurm`` when it cannot start."""
    cluster = _started(lambda: MultiNodeCluster(4, partitions=NODE_PARTITIONS), "multi-node Slurm cluster")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def dp2_reference(slurm, tmp_path_factory):
    """pretrain.sbatch on one node of ``slurm``, two srun tasks of one rank (DP=2), uninterrupted:
    what every DP=2 pretraining job of these tests must reproduce, loss for loss."""
    d = tmp_path_factory.mktemp("dp2_reference")
    return Reference(slurm, str(d / "ckpt"), str(d / "job.out"))


@pytest.fixture(autouse=True)
def _report_cluster_start(request):
    """Hands the cluster's start time to the summary line, through the test's report (under
    xdist the summary is written by the controller, which does not run this directory's fixtures)."""
    yield
    if _START["seconds"] is not None:
        request.node.user_properties.append(("slurm_cluster_start_s", _START["seconds"]))
