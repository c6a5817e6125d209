"""TP=2 generation equals TP=1 (gloo, two processes, weights resharded via dist_checkpointing)."""

import json
import os
import subprocess
import sys

import numpy as np

from megatron_ualm.config import make_config
from megatron_ualm.vocab import UALMVocab

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")


def launch(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", WORKER, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_tp2_generation_equals_tp1(tmp_path):
    launch(1, "reference", "--dir", str(tmp_path))
    launch(2, "tp", "--dir", str(tmp_path), "--tp", "2")
    ref = json.loads((tmp_path / "reference1.json").read_text())
    tp = json.loads((tmp_path / "tp2.json").read_text())
    assert len(ref) == len(tp) == 3
    for a, b in zip(ref, tp):
        assert a["tokens"] == b["tokens"] and a["codes"] == b["codes"]
        for x, y in zip(a["first_scores"], b["first_scores"]):
            np.testing.assert_allclose(x, y, atol=1e-4)
    # The audio prompt wrote audio (at least min_audio_seconds = 5 frames + K - 1 flush steps).
    vocab = UALMVocab.from_config(make_config("debug"))
    assert sum(ref[1]["tokens"].count(t) for t in vocab.audio_steps) >= 5 + vocab.num_codebooks - 1
