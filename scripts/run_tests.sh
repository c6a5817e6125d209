#!/bin/bash
# Sets up .venv (scripts/setup.sh) and runs the CPU test suite. Extra arguments go to pytest.
#
#   bash scripts/run_tests.sh            # everything (CI): the slowest tests' durations are printed
#   bash scripts/run_tests.sh --quick    # the developer's loop: without the `slow` and `slurm` tests
#
# Tests run in UALM_TEST_WORKERS pytest-xdist workers (default: 2, or 1 on a one-core machine;
# 0 runs them in this process), one test file per worker at a time and tests/slurm/ as one unit
# (tests/conftest.py schedules them).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
bash scripts/setup.sh
# Two workers: measured on the 2-core CI machine (README, "Tests run in pytest-xdist workers");
# more are not measured. nproc obeys OMP_NUM_THREADS / OMP_THREAD_LIMIT, so it reads the cores without them.
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
workers=${UALM_TEST_WORKERS:-$(( cores < 2 ? 1 : 2 ))}
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$quick" = 1 ]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile -m "not slow and not slurm" "$@" tests
fi
# Debian's slurm-wlm + munge for tests/slurm (a one-node cluster on localhost); UALM_SKIP_SLURM=1 skips both.
start=$SECONDS; bash scripts/setup_slurm.sh; echo "setup_slurm: $((SECONDS - start)) s"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile --durations=25 "$@" tests
