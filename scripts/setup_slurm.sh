#!/bin/bash
# Installs Debian's Slurm (slurm-wlm: slurmctld, slurmd, the clients) and munge for the
# clusters that tests/slurm starts: one node on localhost, and several nodes on this machine
# (network namespaces on a bridge, which also need iproute2's ip and util-linux's nsenter and
# unshare). Idempotent: does nothing when they are already installed. Needs root (or
# password-less sudo) on a Debian/Ubuntu machine; CI is one.
#
# The daemons are not started here (and the packages' systemd units are never used): the tests
# write their own slurm.conf and munge key under a temporary directory and start munged,
# slurmctld and slurmd by hand (tests/slurm/conftest.py).
#
# Developer machines without root: UALM_SKIP_SLURM=1 skips this script and the Slurm tests
# (they are reported as skipped with that reason). CI never sets it, so there a machine that
# cannot install or start Slurm fails the Slurm tests with the reason.
set -euo pipefail

if [ "${UALM_SKIP_SLURM:-0}" = 1 ]; then
  echo "setup_slurm: UALM_SKIP_SLURM=1, Slurm not installed; tests/slurm will be skipped"
  exit 0
fi

have_slurm() {
  local b
  for b in slurmctld slurmd sbatch srun scontrol sdiag munged mungekey ip nsenter unshare; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 1
  done
}

if have_slurm; then
  echo "setup_slurm: $(PATH="$PATH:/usr/sbin" slurmctld -V) and munge already installed"
  exit 0
fi

start=$SECONDS
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "setup_slurm: Slurm is not installed and this user cannot install it (not root, no password-less sudo)." >&2
  echo "setup_slurm: install it with 'apt-get install slurm-wlm munge', or set UALM_SKIP_SLURM=1 to skip tests/slurm." >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_slurm: no apt-get here; install Slurm (slurmctld, slurmd, clients) and munge yourself," \
       "or set UALM_SKIP_SLURM=1 to skip tests/slurm" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
install=("${as_root[@]}" apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 slurm-wlm munge
         iproute2 util-linux)
# A fresh machine may have empty package lists; refresh them only when the install needs it.
if ! "${install[@]}" >/tmp/setup_slurm.apt.log 2>&1; then
  "${as_root[@]}" apt-get update -q >>/tmp/setup_slurm.apt.log 2>&1
  "${install[@]}" >>/tmp/setup_slurm.apt.log 2>&1 || {
    tail -n 30 /tmp/setup_slurm.apt.log >&2
    echo "setup_slurm: apt-get install slurm-wlm munge iproute2 util-linux failed (log: /tmp/setup_slurm.apt.log)" >&2
    exit 1
  }
fi
have_slurm || { echo "setup_slurm: slurm-wlm installed but its programs are missing from PATH" >&2; exit 1; }
echo "setup_slurm: installed $(PATH="$PATH:/usr/sbin" slurmctld -V) and munge in $((SECONDS - start)) s"
