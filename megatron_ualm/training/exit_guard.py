"""A training rank that failed exits, whatever else is still running in it.

Launchers (torchrun, nvidia-resiliency-ext's ft_launcher, srun) act when a rank *exits*: only
then do they stop the other ranks and end or restart the job. An exception that escapes the
training loop (a collective that timed out, a peer that vanished) only starts Python's exit,
which then waits for non-daemon threads, atexit handlers (multiprocessing joins its children)
and module teardown; any of them can block for good, and the whole allocation then waits with
it. Issue 21 measured exactly that: gloo's "Timed out waiting 300000ms for recv" was raised,
and 14 minutes later every process was still alive. (That cause, data-loader workers that a
dropped loader left running, is fixed in ``megatron_ualm.data.blend``; this guard bounds the
causes nobody has met yet.)

``install()`` chains a ``sys.excepthook``: on an uncaught exception it prints the traceback as
usual and arms ``SIGALRM`` (default action: terminate) for ``UALM_EXIT_GRACE_SECONDS`` (default
60); ``arm()`` does the same for an exit the loop chose (an interrupted run). A clean exit is
much faster; one that is stuck is ended by the kernel, Python state notwithstanding, and the
launcher sees the rank fail.
"""

from __future__ import annotations

import os
import signal
import sys

GRACE_VARIABLE = "UALM_EXIT_GRACE_SECONDS"
DEFAULT_GRACE_SECONDS = 60


def grace_seconds() -> int:
    """Seconds a failed rank may spend exiting (``UALM_EXIT_GRACE_SECONDS``, 0 turns the guard off)."""
    value = os.environ.get(GRACE_VARIABLE, str(DEFAULT_GRACE_SECONDS))
    try:
        return max(int(value), 0)
    except ValueError:
        raise ValueError(f"{GRACE_VARIABLE}={value!r}: give a whole number of seconds (0 turns the guard off)") \
            from None


def arm(cause: str, quiet: bool = False) -> None:
    """Ends this process ``UALM_EXIT_GRACE_SECONDS`` from now if its exit has not (0: never).

    Args:
        cause: what ends the process, for the line that says so on stderr.
        quiet: no line (a caller that prints its own).
    """
    grace = grace_seconds()
    if not grace:
        return
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(grace)
    if not quiet:
        rank = os.environ.get("RANK", "0")
        print(f"[rank{rank}] exiting after {cause}; forced in {grace} s if the exit hangs ({GRACE_VARIABLE})",
              file=sys.stderr, flush=True)


def install() -> None:
    """Arms the exit deadline on every uncaught exception of this process (idempotent)."""
    previous = sys.excepthook
    if getattr(previous, "_ualm_exit_guard", False):
        return
    grace_seconds()  # a bad value fails now, not in the hook

    def excepthook(kind, value, traceback) -> None:
        arm(kind.__name__)
        previous(kind, value, traceback)

    excepthook._ualm_exit_guard = True
    sys.excepthook = excepthook
