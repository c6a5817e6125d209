"""examples/post_training/ualm_gen.sh end to end on CPU (debug flavor, tiny random parts): the
starting checkpoint, preference pairs, the adaptation SFT on the winners, DPO; every stage's
outputs are checked. (ualm_reason.sh runs the same tools and entry points in a longer chain;
run it by hand: about 4 minutes on 2 cores.)

Sizes come from the environment (the config reads them), kept small so the run takes about two
minutes on two cores.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # measured above 5 s on 2 cores: scripts/run_tests.sh --quick leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS, CANDIDATES, SFT_ITERS, DPO_ITERS = 6, 3, 3, 4


def test_finished_run_started_again_builds_its_loader():
    """A recipe rerun starts finished steps again: the loader of a run at its last sample draws
    nothing, and must not fail (Megatron's sampler refuses to start at the end)."""
    from megatron_ualm.data.blend import build_data_loader

    loader = build_data_loader(list(range(8)), 16, None, 2, consumed_samples=8, collate_fn=lambda items: items)
    assert next(iter(loader)) == [0, 1]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("recipe") / "gen")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}  # run here, not via srun
    env.pop("UALM_FALLBACK_NOTICE_SHOWN", None)  # the recipe's own first step must print the notice
    env.update(WORKDIR=w, PYTHON=sys.executable, PRETRAIN_ITERS="4", SFT_ITERS=str(SFT_ITERS),
               DPO_ITERS=str(DPO_ITERS), NUM_PROMPTS=str(PROMPTS), NUM_CANDIDATES=str(CANDIDATES),
               OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "post_training", "ualm_gen.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ualm_gen.sh failed:\n{log[-8000:]}"
    return w, log


def _lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_stages_in_order(recipe):
    _, log = recipe
    steps = [line for line in log.splitlines() if line.startswith("== ")]
    assert [s.split(" (")[0][:14] for s in steps] == ["== setup: tiny", "== setup: the ", "== 1/3 prefere",
                                                      "== 2/3 adaptat", "== 3/3 DPO fro"]
    assert "UALM-Gen post-training done" in log


def test_log_holds_what_a_person_acts_on(recipe):
    """Megatron's argument dump of each stage is in a file beside its checkpoint, its memory report
    prints once per run, its INFO logs and internal-tool notices stay out; TensorBoard is written."""
    w, log = recipe
    assert "------------------------ arguments" not in log and "one_logger" not in log and "INFO:" not in log
    for stage in ("adapted", "dpo"):
        assert os.path.isfile(os.path.join(w, stage, "megatron_arguments.txt")), os.listdir(os.path.join(w, stage))
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(w, stage, "tb")))
        assert os.path.isfile(os.path.join(w, stage, "loss.png"))
    assert log.count("Theoretical memory footprints") == 3  # pretraining, adaptation, DPO: once each
    if importlib.util.find_spec("transformer_engine") is None:  # the fallback notice: the first step's only
        assert log.count("Transformer Engine / Apex not installed") == 1, log.count("Transformer Engine / Apex")
    assert len(log.splitlines()) < 1200, len(log.splitlines())


def test_checkpoints_describe_themselves(recipe):
    from megatron_ualm.checkpoint_format import read_description

    w, _ = recipe
    for name, entry, iters in (("base", "pretrain", 4), ("adapted", "finetune", SFT_ITERS), ("dpo", "dpo", DPO_ITERS)):
        with open(os.path.join(w, name, "latest_checkpointed_iteration.txt")) as f:
            assert int(f.read()) == iters, name
        record = read_description(os.path.join(w, name))
        assert record["flavor"] == "debug" and record["trained_by"] == f"megatron_ualm.{entry}", name
        assert record["vocab"]["tokenizer"]["sha256"], name


def test_pairs_and_their_shards(recipe):
    w, _ = recipe
    summary = json.load(open(os.path.join(w, "pairs", "summary.json")))
    pairs = _lines(os.path.join(w, "pairs", "pairs.jsonl"))
    assert summary["prompts"] == PROMPTS and summary["pairs"] == len(pairs) >= PROMPTS - 1
    assert all(len(p["candidates"]) == CANDIDATES and {"clap", "aes"} <= set(p["scores"]["chosen"]) for p in pairs)
    assert len(_lines(os.path.join(w, "pairs", "adaptation.jsonl"))) == len(pairs)
    for shards, name in (("adaptation", "chat"), ("dpo", "preference")):
        task = json.load(open(os.path.join(w, "shards", shards, f"{name}.task-00000-of-00001.json")))
        assert task["counts"]["samples"] == len(pairs) and task["counts"]["rejected"] == 0, shards
        assert os.path.isfile(os.path.join(w, f"{shards}_blend.json"))


def test_training_metrics(recipe):
    from megatron_ualm.training.plot import read_metrics

    w, _ = recipe
    sft = {r["iteration"]: r for r in read_metrics(os.path.join(w, "adapted", "metrics.jsonl"))}
    assert sorted(sft) == list(range(1, SFT_ITERS + 1)) and all(math.isfinite(r["lm loss"]) for r in sft.values())
    dpo = {r["iteration"]: r for r in read_metrics(os.path.join(w, "dpo", "metrics.jsonl"))}
    assert sorted(dpo) == list(range(1, DPO_ITERS + 1))
    assert dpo[1]["dpo loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as its reference
    for row in dpo.values():
        assert {"loss", "sft loss", "reward accuracy", "reward margin", "chosen logp", "rejected codebook_7 logp"} <= set(row)
        assert row["samples_preference"] == 4
    assert os.path.isfile(os.path.join(w, "dpo", "reference_logps", "reference.json"))
