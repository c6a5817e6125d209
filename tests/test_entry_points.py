"""Every entry point and every tool answers ``--help``: exit 0, its own options, no traceback.

The list comes from the package itself (``[project.scripts]`` in pyproject.toml, ``tools/*.py``,
the ``python -m megatron_ualm.<name>`` programs), so a new entry point is covered the day it is
added; ``EXPECTED`` names one option of each that only its own help prints.
"""

import os
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow  # measured above 5 s on 2 cores: scripts/run_tests.sh --quick leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A flag (or group title) each program's help must show: proof that it printed *its* options.
EXPECTED = {
    "megatron_ualm.pretrain": "--blend-file",
    "megatron_ualm.finetune": "--pretrained-checkpoint",
    "megatron_ualm.dpo": "--beta",
    "megatron_ualm.generate": "--cfg-weight",
    "megatron_ualm.evaluate": "usage:",
    "megatron_ualm.quickstart": "--workdir",
    "megatron_ualm.conversion": "import",
    "megatron_ualm.conversion.cli": "export",
    "preprocess_text": "--num-tasks",
    "preprocess_generation": "--codec-path",
    "preprocess_understanding": "--audio-in-storage",
    "preprocess_chat": "--num-tasks",
    "preprocess_preferences": "--num-tasks",
    "make_preference_pairs": "usage:",
    "build_reflection_data": "usage:",
    "build_blend": "--upsample",
    "inspect_shards": "--show",
    "plot_losses": "usage:",
    "convert_checkpoint": "export",
}


def _programs():
    """(id, argv, expected, program name) for every program of the repository."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    out = []
    for name, target in sorted(scripts.items()):
        module, func = target.split(":")
        code = f"import sys; from {module} import {func} as main; sys.argv = [{name!r}, '--help']; sys.exit(main())"
        key = module if module in EXPECTED else func.removesuffix("_main")
        out.append((name, [sys.executable, "-c", code], key, name))
    for tool in sorted(os.listdir(os.path.join(ROOT, "tools"))):
        if tool.endswith(".py"):
            out.append((f"tools/{tool}", [sys.executable, os.path.join(ROOT, "tools", tool), "--help"], tool[:-3], tool))
    for module in ("pretrain", "generate", "quickstart", "finetune", "dpo", "evaluate", "conversion"):
        if os.path.exists(os.path.join(ROOT, "megatron_ualm", f"{module}.py")) or module == "conversion":
            out.append((f"-m megatron_ualm.{module}", [sys.executable, "-m", f"megatron_ualm.{module}", "--help"],
                        f"megatron_ualm.{module}", f"python -m megatron_ualm.{module}"))
    return out


PROGRAMS = _programs()


@pytest.fixture(scope="module")
def helps():
    """Runs every ``--help`` once, two at a time (each imports torch, some Megatron)."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    env.pop("UALM_FALLBACK_NOTICE_SHOWN", None)  # set by this pytest process's own import

    def run(item):
        argv = item[1]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd="/")

    with ThreadPoolExecutor(2) as pool:
        return dict(zip([p[0] for p in PROGRAMS], pool.map(run, PROGRAMS)))


@pytest.mark.parametrize("name,key", [(p[0], p[2]) for p in PROGRAMS], ids=[p[0] for p in PROGRAMS])
def test_help_exits_zero_with_its_options(helps, name, key):
    proc = helps[name]
    assert proc.returncode == 0, f"{name} --help exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert key in EXPECTED, f"add {key!r} to EXPECTED with an option only its help prints"
    assert EXPECTED[key] in proc.stdout, f"{name} --help does not show {EXPECTED[key]}:\n{proc.stdout[:2000]}"
    assert re.search(r"usage:", proc.stdout)


@pytest.mark.parametrize("name,prog", [(p[0], p[3]) for p in PROGRAMS], ids=[p[0] for p in PROGRAMS])
def test_usage_names_the_program_as_it_was_started(helps, name, prog):
    """``ualm-generate`` says ``usage: ualm-generate``, not another way to start it."""
    out = helps[name].stdout
    assert re.search(rf"^usage: {re.escape(prog)}\s", out, re.M), f"{name}: {out[:300]}"


def test_pretrain_help_has_the_ualm_group(helps):
    out = helps["-m megatron_ualm.pretrain"].stdout
    assert "\nUALM:\n" in out and "--freeze" in out and "--tensor-model-parallel-size" in out


def test_fallback_warnings_print_once(helps):
    """Without Transformer Engine / Apex: one summary line instead of Megatron's five warnings."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here: nothing falls back")
    err = helps["-m megatron_ualm.pretrain"].stderr
    assert err.count("Transformer Engine") == 1, err
    assert "Falling back" not in err and "No CUDA runtime is found" not in err
