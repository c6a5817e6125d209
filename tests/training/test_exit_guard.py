"""A rank that fails exits (issue 21): launchers act only when a rank's process ends.

- Data-loader workers ignore SIGTERM (Slurm's signal is the training process's to handle), so
  Python's multiprocessing, which ends daemon children with SIGTERM and joins them at exit,
  waited forever for the workers of an iterator that outlived ``main`` (a failed run keeps its
  iterators in the traceback). The loader's own shutdown now runs first, also when only the
  iterator is kept (as Megatron keeps it).
- ``exit_guard``: a process whose exit is held by something else (here a non-daemon thread that
  never ends) is ended ``UALM_EXIT_GRACE_SECONDS`` after its uncaught exception.

Each child process gets a generous timeout: a hang fails the test, the exits take seconds.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

LOADER = textwrap.dedent("""
    import sys
    from megatron_ualm.data.blend import build_data_loader

    def make():
        loader = build_data_loader(list(range(64)), 8, None, 2, num_workers=2, collate_fn=lambda x: x)
        return iter(loader)  # the loader itself is dropped, as Megatron drops it

    iterator = make()
    print("batch", next(iterator), flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("Timed out waiting 10000ms for recv operation to complete")
""")


def run(code: str, *args: str, env: dict = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", **(env or {}))
    try:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the process did not exit within {timeout:.0f} s:\n{err.stderr}")


@pytest.mark.parametrize("how", ["returns", "raise"])
def test_a_process_whose_loader_iterator_outlives_main_exits(how):
    proc = run(LOADER, how, env={"UALM_EXIT_GRACE_SECONDS": "0"})  # no guard: the fix alone
    assert "batch [0, 1]" in proc.stdout, proc.stderr
    assert proc.returncode == (1 if how == "raise" else 0), proc.stderr[-3000:]
    if how == "raise":
        assert "Timed out waiting" in proc.stderr


GUARDED = textwrap.dedent("""
    import threading
    from megatron_ualm.training import exit_guard

    exit_guard.install()
    exit_guard.install()  # idempotent: one hook
    threading.Thread(target=threading.Event().wait, name="held").start()  # non-daemon, never ends
    raise RuntimeError("a collective timed out")
""")


def test_a_failed_process_held_by_a_thread_is_ended_after_the_grace_time():
    proc = run(GUARDED, env={"UALM_EXIT_GRACE_SECONDS": "2", "RANK": "3"})
    assert proc.returncode == -signal.SIGALRM, proc.stderr
    assert proc.stderr.count("[rank3] exiting after RuntimeError; forced in 2 s") == 1, proc.stderr
    assert "RuntimeError: a collective timed out" in proc.stderr  # the traceback is still printed


def test_without_the_guard_the_same_process_is_held():
    """The control: what the guard bounds does hang (still alive 10 s after its traceback)."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", GUARDED], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, UALM_EXIT_GRACE_SECONDS="0"))
    try:
        seen = []
        for line in proc.stderr:  # until the traceback's last line (imports may be slow on a busy machine)
            seen.append(line)
            if "RuntimeError: a collective timed out" in line:
                break
        assert seen and "a collective timed out" in seen[-1], "".join(seen)
        time.sleep(10)
        assert proc.poll() is None, "the process exited by itself: the control shows nothing"
    finally:
        proc.kill()
        proc.wait()
