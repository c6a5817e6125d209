"""Shared test set-up: CPU shims before anything touches Megatron, one parallel state, and the
scheduling that ``pytest -n N --dist loadfile`` (scripts/run_tests.sh) runs the suite under."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ualm_testing.py, for every test file


def _own_tmpdir() -> None:
    """Gives the programs the tests start one TMPDIR for the whole run, removed when it ends.

    Every torchrun leaves a ``torchelastic_*`` folder in TMPDIR, and a killed child its
    ``pymp-*``: without this, each run of the suite would leave a few hundred in /tmp. The process
    that starts the run (xdist's controller, or pytest alone) makes the folder; xdist's workers
    inherit it through the environment. pytest's own ``tmp_path`` folders stay in the system's
    temporary folder (resolved before TMPDIR changes), where pytest keeps the last three runs."""
    if os.environ.get("UALM_TESTS_TMPDIR"):
        return
    root = tempfile.mkdtemp(prefix="ualm-tests-", dir=tempfile.gettempdir())  # gettempdir() caches it
    os.environ["UALM_TESTS_TMPDIR"] = os.environ["TMPDIR"] = root
    atexit.register(shutil.rmtree, root, ignore_errors=True)


_own_tmpdir()

import pytest  # noqa: E402

from megatron_ualm.compat import quiet

quiet.install()  # before torch is imported: its "No CUDA runtime" log line would end pytest's output

from megatron_ualm.compat import cpu as cpu_compat  # noqa: E402  (imports torch)

cpu_compat.apply()


@pytest.fixture(scope="session")
def parallel_world_of_one():
    """Megatron parallel state with TP = PP = 1 in this process (single-process tests)."""
    from megatron_ualm import api

    api.initialize_parallel(seed=1234, timeout_minutes=2)
    yield


SLURM_TESTS = "tests/slurm/"


def pytest_collection_modifyitems(items):
    """Every test under tests/slurm runs jobs on a cluster it starts: ``slurm`` (and ``slow``)."""
    for item in items:
        if item.nodeid.startswith(SLURM_TESTS):
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.slow)


def _unit(nodeid: str) -> str:
    """The scheduling unit of a test: its file, or tests/slurm/ as a whole."""
    path = nodeid.split("::", 1)[0]
    return SLURM_TESTS if path.startswith(SLURM_TESTS) else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadfile``: one unit (a test file, or tests/slurm/ as a whole) per worker at
    a time. A file's module-scoped fixtures, such as a reference run or a whole recipe, are built
    once; the Slurm tests share one cluster and their jobs do not compete with each other for the
    node. (xdist's ``loadgroup`` marks cannot do this: with pytest 9.2, xdist 3.8 cannot rename
    node ids.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return FileScheduling(config, log)


# The Slurm tests' time against their CI budgets, summed here (in the process that reports, which
# under xdist is the controller: it sees every test's report but not tests/slurm's conftest).
# The multi-node tests (issue 21) have a budget of their own, and report the times they measured
# (hang detection, restart, requeue) as ``slurm_timing:<what>`` properties.
MULTINODE_TESTS = "tests/slurm/test_multinode.py"
_SLURM_TIMES = {"tests": 0.0, "multinode": 0.0, "start": None, "timings": {}}


def pytest_runtest_logreport(report):
    if report.nodeid.startswith(SLURM_TESTS):
        _SLURM_TIMES["tests"] += report.duration
        if report.nodeid.startswith(MULTINODE_TESTS):
            _SLURM_TIMES["multinode"] += report.duration
        for name, value in report.user_properties:
            if name == "slurm_cluster_start_s":
                _SLURM_TIMES["start"] = value
            elif name.startswith("slurm_timing:"):
                _SLURM_TIMES["timings"][name.split(":", 1)[1]] = value


def pytest_terminal_summary(terminalreporter):
    if _SLURM_TIMES["tests"]:
        start = _SLURM_TIMES["start"]
        start = f", cluster start {start:.1f} s" if start is not None else ""
        one_node = _SLURM_TIMES["tests"] - _SLURM_TIMES["multinode"]
        terminalreporter.write_line(f"Slurm tests ({SLURM_TESTS}): {one_node:.0f} s one-node{start} "
                                    f"(CI budget: 300 s), {_SLURM_TIMES['multinode']:.0f} s multi-node "
                                    "(CI budget: 300 s)")
    if _SLURM_TIMES["timings"]:
        terminalreporter.write_line("Multi-node, measured: " + "; ".join(
            f"{k} {v}" for k, v in sorted(_SLURM_TIMES["timings"].items())))
