#!/bin/bash
# Sets up .venv (scripts/setup.sh) and runs the whole CPU test suite. Extra arguments go to pytest.
# Tests run in UALM_TEST_WORKERS pytest-xdist workers (default: the CPU cores, at most 4; 0 runs
# them in this process), one test file per worker at a time (tests/conftest.py schedules them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian's slurm-wlm + munge for tests/slurm (a one-node cluster on localhost); UALM_SKIP_SLURM=1 skips both.
start=$SECONDS; bash scripts/setup_slurm.sh; echo "setup_slurm: $((SECONDS - start)) s"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
workers=${UALM_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile "$@" tests
