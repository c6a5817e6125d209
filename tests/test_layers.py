"""The package's layers (README, "Layout"; pyproject's import-linter contracts): every import,
also one inside a function, points down; no entry point imports another; every folder is a
regular package."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron_ualm")


def _lint(root: str) -> subprocess.CompletedProcess:
    """``lint-imports`` of the contracts in ``root``'s pyproject, on the package under ``root``."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_contracts_are_kept():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("where,line", [
    ("data/blend.py", "    from megatron_ualm.training import loop  # noqa\n"),  # upward, inside a function
    ("pretrain.py", "from megatron_ualm import finetune  # noqa\n"),  # an entry point importing another
])
def test_a_broken_layer_is_reported(tmp_path, where, line):
    shutil.copytree(PACKAGE, tmp_path / "megatron_ualm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    target = tmp_path / "megatron_ualm" / where
    text = target.read_text()
    if line.startswith(" "):
        text += "\n\ndef _upward():\n" + line
    else:
        text = line + text
    target.write_text(text)
    proc = _lint(str(tmp_path))
    assert proc.returncode != 0 and "BROKEN" in proc.stdout.upper(), proc.stdout[-3000:]


def test_every_folder_is_a_regular_package():
    missing = [os.path.relpath(d, ROOT) for d, _, files in os.walk(PACKAGE)
               if "__pycache__" not in d and any(f.endswith(".py") for f in files) and "__init__.py" not in files]
    assert not missing, f"folders without __init__.py (namespace packages): {missing}"
