"""A real one-node Slurm cluster for the tests in this directory (session scope).

The cluster (``localslurm.SlurmCluster``: munged, slurmctld and slurmd on localhost, started by
hand, files under a temporary directory) is started once, when the first Slurm test needs it,
and stopped at the end of the session, failures included: every job is cancelled, then the
daemons are stopped by their pids (and they die with the test process if it is killed).

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
from localslurm import SlurmCluster, SlurmError  # noqa: E402

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
_HERE = os.path.relpath(os.path.dirname(os.path.abspath(__file__)), REPO).replace(os.sep, "/") + "/"
_TIMES = {"tests": 0.0, "start": None}


@pytest.fixture(scope="session")
def slurm():
    """The running cluster; fails (never skips, unless UALM_SKIP_SLURM=1) when it cannot start."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: the Slurm tests are skipped on this machine")
    t0 = time.monotonic()
    cluster = problem = None
    try:
        cluster = SlurmCluster().start()
    except SlurmError as err:
        problem = str(err)
    if problem is not None:
        pytest.fail(f"cannot start the one-node Slurm cluster: {problem}", pytrace=False)
    _TIMES["start"] = time.monotonic() - t0
    try:
        yield cluster
    finally:
        cluster.stop()


def pytest_runtest_logreport(report):
    if report.nodeid.startswith(_HERE):
        _TIMES["tests"] += report.duration


def pytest_terminal_summary(terminalreporter):
    if _TIMES["tests"]:
        start = f", cluster start {_TIMES['start']:.1f} s" if _TIMES["start"] is not None else ""
        terminalreporter.write_line(f"Slurm tests ({_HERE}): {_TIMES['tests']:.0f} s in all{start} "
                                    "(CI budget: 300 s)")
