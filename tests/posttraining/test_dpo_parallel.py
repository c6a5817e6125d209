"""DPO under TP / PP / SP: the loss, its report and every gradient shard equal TP=PP=1 (float32).

Runs tests/models/parallel_worker.py with ``--objective dpo``: two micro-batches of three
synthetic preference pairs (text-to-audio, audio understanding, text + audio reasoning) through
Megatron's schedules and DDP, reference log-probabilities scored first by a forward-only pass
of the same weights under the same parallelism.
"""

import importlib.util
import json
import math
import os

import pytest

pytestmark = pytest.mark.slow  # measured above 5 s on 2 cores: scripts/run_tests.sh --quick leaves it out

def _load(path: str, name: str):
    """A test module of another directory (tests/ has no packages), for its helpers."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_models = _load(os.path.join(os.path.dirname(__file__), os.pardir, "models", "test_parallel.py"), "ualm_test_parallel")
TOLERANCE = 1e-6


def launch(nproc: int, *args: str) -> None:
    _models.launch(nproc, "--objective", "dpo", *args)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dpo_parallel"))
    launch(1, "reference", "--dir", d)
    return d


CASES = {"tp2-sp": dict(tp=2, pp=1, sp=True), "pp2": dict(tp=1, pp=2), "tp2pp2": dict(tp=2, pp=2)}


@pytest.mark.parametrize("name", list(CASES))
def test_dpo_matches_single_process(reference_dir, name):
    case = CASES[name]
    args = ["parallel", "--dir", reference_dir, "--tag", name, "--tp", str(case["tp"]), "--pp", str(case["pp"])]
    launch(case["tp"] * case["pp"], *args, *(["--sp"] if case.get("sp") else []))
    with open(os.path.join(reference_dir, f"{name}.json")) as f:
        result = json.load(f)
    assert result["grads_compared"] == result["trainable_params"] > 0
    # DPO gradients are sums over response cells (not per-cell means): compare relative to the largest.
    assert result["max_grad_diff"] <= TOLERANCE * max(1.0, result["max_grad_ref"]), result
    assert result["max_loss_rel_diff"] <= TOLERANCE, result["max_loss_rel_diff"]
    for report in result["reports"]:
        (total, pairs) = report["dpo loss"]
        assert pairs == 3 and total / pairs == pytest.approx(math.log(2), abs=1e-6)  # reference == policy
        assert {f"rejected codebook_{k} logp" for k in range(8)} <= set(report)
