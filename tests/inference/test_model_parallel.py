"""TP=2 and PP=2 generation equal TP=PP=1 (gloo, two processes, weights resharded via
dist_checkpointing)."""

import json
import os

import numpy as np
import pytest

from megatron_ualm.config import make_config
from megatron_ualm.vocab import UALMVocab
from ualm_testing import run_ok, torchrun

pytestmark = pytest.mark.slow  # measured above 5 s on 2 cores: scripts/run_tests.sh --quick leaves it out

WORKER = os.path.join(os.path.dirname(__file__), "mp_worker.py")


def launch(nproc, *args):
    run_ok(torchrun(nproc, WORKER, *args), timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The TP=PP=1 decode of the mixed batch, and the checkpoint it saved."""
    folder = tmp_path_factory.mktemp("generation")
    launch(1, "reference", "--dir", str(folder))
    result = json.loads((folder / "reference_tp1_pp1.json").read_text())
    # The audio prompt wrote audio (at least min_audio_seconds = 5 frames + K - 1 flush steps).
    vocab = UALMVocab.from_config(make_config("debug"))
    assert sum(result[1]["tokens"].count(t) for t in vocab.audio_steps) >= 5 + vocab.num_codebooks - 1
    return folder, result


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_model_parallel_generation_equals_single_rank(reference, tp, pp):
    folder, ref = reference
    launch(tp * pp, "parallel", "--dir", str(folder), "--tp", str(tp), "--pp", str(pp))
    got = json.loads((folder / f"parallel_tp{tp}_pp{pp}.json").read_text())
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        assert a["tokens"] == b["tokens"] and a["codes"] == b["codes"]
        for x, y in zip(a["first_scores"], b["first_scores"]):
            np.testing.assert_allclose(x, y, atol=1e-4)
