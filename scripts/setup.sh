#!/bin/bash
# Creates .venv (Python 3.12) and installs megatron_ualm with its test tools. Idempotent.
# Torch comes from PyPI (a CUDA build that also runs on the CPU); the version is pinned to the
# one the GPU machines and the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.11.0}

find_python312() {
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | tail -n 1 || true)
    if [ -n "$v" ]; then PYENV_VERSION=$v pyenv which python; return; fi
  fi
  command -v python3.12 || { echo "setup: Python 3.12 is required (megatron-core 0.19); install it with pyenv" >&2; exit 1; }
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  rm -rf .venv
  "$(find_python312)" -m venv .venv
fi
# A set-up that already succeeded for this pyproject.toml, this script and this torch is not
# redone (pip's resolution alone takes over a minute); the package is installed editable, so
# code changes need no reinstall. Delete .venv/.setup-done to force one.
stamp="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) torch==$TORCH_VERSION"
if [ "$(cat .venv/.setup-done 2>/dev/null)" = "$stamp" ]; then
  echo "setup: .venv is up to date (delete .venv/.setup-done to reinstall)"
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" "torchaudio==${TORCH_VERSION}"
# torch named again: the newest torchvision (timm's, in [eval]) would otherwise upgrade it.
.venv/bin/python -m pip install -q -e ".[dev,eval]" "torch==${TORCH_VERSION}" "torchaudio==${TORCH_VERSION}"
# torchopenl3 (OpenL3, the FD backbone) pins resampy<0.3, which no longer builds; it runs on [eval]'s resampy.
.venv/bin/python -m pip install -q --no-deps "torchopenl3==1.0.1"
# nvidia-resiliency-ext (the [ft] extra: ft_launcher and Megatron's --enable-ft-package, which
# examples/slurm/launch.sh uses with FAULT_TOLERANCE=1), pinned as megatron-core 0.19 pins it.
# From 0.5 its wheels are tagged manylinux_2_39, so on an older glibc (Debian 12: 2.36) pip would
# pick 0.4.1 instead. Its one compiled module (CUPTI profiling, which fault tolerance does not
# load) needs only GLIBC_2.32: download the manylinux_2_39 wheel, retag it for this machine, and
# install it with its dependencies (httpx, nvidia-ml-py, grpcio, ...). It imports without CUDA.
NVRX_VERSION=0.6.0
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('nvidia-resiliency-ext') != '$NVRX_VERSION')" 2>/dev/null; then
  wheels=$(mktemp -d)
  .venv/bin/python -m pip install -q wheel
  .venv/bin/python -m pip download -q --no-deps "nvidia-resiliency-ext==$NVRX_VERSION" -d "$wheels" \
    --platform manylinux_2_39_x86_64 --python-version 3.12 --only-binary=:all:
  if ! .venv/bin/python -c "import platform, sys; sys.exit(tuple(map(int, platform.libc_ver()[1].split('.'))) < (2, 39))"; then
    .venv/bin/python -m wheel tags --remove --platform-tag linux_x86_64 "$wheels"/nvidia_resiliency_ext-*.whl >/dev/null
  fi
  .venv/bin/python -m pip install -q "$wheels"/nvidia_resiliency_ext-*.whl "torch==${TORCH_VERSION}"
  rm -rf "$wheels"
fi
.venv/bin/python -c "import nvidia_resiliency_ext.fault_tolerance" || {
  echo "setup: nvidia-resiliency-ext $NVRX_VERSION does not import (needed by FAULT_TOLERANCE=1 and tests/slurm)" >&2; exit 1; }
.venv/bin/python -c "from megatron_ualm.compat import quiet; quiet.install(); import megatron.core, torch
print('megatron-core', megatron.core.__version__, '| torch', torch.__version__, '| setup ok')"
echo "$stamp" > .venv/.setup-done
