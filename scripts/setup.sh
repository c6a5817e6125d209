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
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" "torchaudio==${TORCH_VERSION}"
# torch named again: the newest torchvision (timm's, in [eval]) would otherwise upgrade it.
.venv/bin/python -m pip install -q -e ".[dev,eval]" "torch==${TORCH_VERSION}" "torchaudio==${TORCH_VERSION}"
# torchopenl3 (OpenL3, the FD backbone) pins resampy<0.3, which no longer builds; it runs on [eval]'s resampy.
.venv/bin/python -m pip install -q --no-deps "torchopenl3==1.0.1"
.venv/bin/python -c "import megatron_ualm, megatron.core, torch; print('megatron-core', megatron.core.__version__, '| torch', torch.__version__, '| setup ok')"
