"""Generation metrics over folders: reference statistics, the feature cache, KL / CL pairing by
id, the reports, and ``python -m megatron_ualm.evaluate`` on the tiny backbones."""

import csv
import json
import os

import numpy as np
import pytest

from megatron_ualm import evaluate
from megatron_ualm.evaluation import metrics, tta
from megatron_ualm.tiny import backbones as tiny_models
from megatron_ualm.evaluation.report import PAPER_COLUMNS, markdown_table

IDS = [f"clip{i:02d}" for i in range(6)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    tiny_models.write_clips(root / "ref", IDS, seconds=0.5, seed=1, rates=[16000, 44100])
    # Generated clips carry generate's "_0" suffix; one extra clip has no reference and no prompt.
    tiny_models.write_clips(root / "gen", [f"{i}_0" for i in IDS] + ["extra"], seconds=0.5, seed=2)
    with open(root / "prompts.jsonl", "w") as f:
        for i in IDS:
            f.write(json.dumps({"id": i, "prompt": f"sound number {i}"}) + "\n")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One feature cache for the module: each backbone sees each clip once (OpenL3 is costly on CPU)."""
    return str(tmp_path_factory.mktemp("cache"))


def _flags(tiny_backbones, names=("openl3", "passt", "panns", "clap", "aesthetics")):
    out = []
    for n in names:
        out += [f"--{n}-path", tiny_backbones[n]]
    return out + ["--device", "cpu"]


@pytest.mark.slow
def test_cli_reference_then_generation(folders, tiny_backbones, cache_dir, tmp_path, capsys):
    cache = cache_dir
    ref = str(tmp_path / "ref.npz")
    evaluate.main(["reference", "--audio-dir", str(folders / "ref"), "--out", ref, "--cache-dir", cache,
                   "--fd-backbones", "openl3", "panns", *_flags(tiny_backbones, ("openl3", "passt", "panns"))])
    stats = tta.ReferenceStats.load(ref)
    assert stats.num_clips == 6 and set(stats.fd) == {"openl3", "panns"} and set(stats.passt_probs) == set(IDS)
    out = tmp_path / "out"
    evaluate.main(["generation", "--audio-dir", str(folders / "gen"), "--prompts", str(folders / "prompts.jsonl"),
                   "--reference", ref, "--out", str(out), "--cache-dir", cache, "--fd-backbones", "openl3", "panns",
                   *_flags(tiny_backbones)])
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    assert m["num_clips"] == 7 and m["KL_pairs"] == 6 and m["CL_pairs"] == 6
    for k in ("FD", "FD_panns", "KL", "IS", "CL", "AES", "AES_CE", "AES_PQ"):
        assert np.isfinite(m[k]), k
    assert m["FD"] > 0 and m["IS"] >= 1.0 - 1e-9
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| system | FD | KL | IS | CL | AES |")  # the paper's column order
    rows = list(csv.DictReader(open(out / "samples.csv")))
    assert len(rows) == 7
    by_id = {r["id"]: r for r in rows}
    assert by_id["extra"]["kl"] == "" and by_id["extra"]["clap"] == "" and by_id["extra"]["aes"] != ""
    assert float(by_id["clip03"]["clap"]) == pytest.approx(float(by_id["clip03"]["clap"]))
    assert "sound number clip03" in by_id["clip03"]["prompt"]
    assert "| UALM |" in capsys.readouterr().out
    # The mean of the per-clip KL / CL rows is the reported metric.
    assert np.mean([float(r["kl"]) for r in rows if r["kl"]]) == pytest.approx(m["KL"], rel=1e-9)
    assert np.mean([float(r["clap"]) for r in rows if r["clap"]]) == pytest.approx(m["CL"], rel=1e-9)


@pytest.mark.slow
# The expected FD is computed here from the metric itself, on a few clips of a tiny backbone: a
# singular covariance on purpose (the runner explains it; test_small_sets_explain_themselves).
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_metrics_equal_the_math_on_the_backbone_outputs(folders, loaded_backbones, cache_dir):
    ref_files, gen_files = tta.list_clips(str(folders / "ref")), tta.list_clips(str(folders / "gen"))
    models = {k: loaded_backbones[k] for k in ("openl3", "passt", "panns")}
    cache = tta.FeatureCache(cache_dir)
    stats = tta.compute_reference(ref_files, models, cache, show_progress=False)
    res = tta.evaluate_clips(gen_files, models, stats, show_progress=False)
    gen = tta.extract(gen_files, models, cache, show_progress=False)
    ref = tta.extract(ref_files, models, cache, show_progress=False)
    frames = lambda f: np.concatenate([f[i]["openl3"] for i in f])  # noqa: E731  every OpenL3 frame
    want_fd = metrics.frechet_distance(*metrics.embedding_statistics(frames(gen["openl3"])),
                                       *metrics.embedding_statistics(frames(ref["openl3"])))
    assert res.metrics["FD"] == pytest.approx(want_fd, rel=1e-9)
    probs = lambda f, ids: metrics.softmax(np.stack([f[i]["passt_logits"] for i in ids]))  # noqa: E731
    want_kl = metrics.kl_divergence(probs(gen["passt"], IDS), probs(ref["passt"], IDS)).mean()
    assert res.metrics["KL"] == pytest.approx(want_kl, rel=1e-9)
    want_is = metrics.inception_score(np.stack([gen["panns"][i]["panns_logits"] for i in gen_files]), splits=7)
    assert res.metrics["IS"] == pytest.approx(want_is[0], rel=1e-12)


class _Counting:
    """Wraps a backbone and counts the clips it is asked to process."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0
        self.name, self.identity, self.outputs = inner.name, inner.identity, inner.outputs

    def features(self, waves, sample_rate):
        self.seen += len(waves)
        return self.inner.features(waves, sample_rate)


def test_feature_cache_is_reused_and_invalidated(folders, loaded_backbones, tmp_path):
    files = tta.list_clips(str(folders / "ref"))
    cache = tta.FeatureCache(str(tmp_path / "cache"))
    counting = _Counting(loaded_backbones["passt"])
    first = tta.extract(files, {"passt": counting}, cache, show_progress=False)
    assert counting.seen == 6
    again = tta.extract(files, {"passt": counting}, cache, show_progress=False)
    assert counting.seen == 6  # all from the cache
    assert all(np.array_equal(first["passt"][i]["passt_logits"], again["passt"][i]["passt_logits"]) for i in IDS)
    os.utime(files[IDS[0]], ns=(1, 1))  # a touched file is recomputed
    tta.extract(files, {"passt": counting}, cache, show_progress=False)
    assert counting.seen == 7


def test_reference_from_other_weights_is_not_used(folders, tiny_backbones, tmp_path):
    from megatron_ualm.evaluation.backbones import PaSST

    files = tta.list_clips(str(folders / "ref"))
    stats = tta.compute_reference(files, {"passt": PaSST(tiny_backbones["passt"], device="cpu")},
                                         tta.FeatureCache(None), fd_backbones=(), show_progress=False)
    other = PaSST(tiny_models.write_tiny_passt(tmp_path / "other", seed=5), device="cpu")
    res = tta.evaluate_clips(files, {"passt": other}, stats, show_progress=False)
    assert "KL" not in res.metrics and any("another PaSST checkpoint" in n for n in res.notes)
    unpaired = {f"x{i}": p for i, p in files.items()}  # ids that name no reference clip
    res = tta.evaluate_clips(unpaired, {"passt": PaSST(tiny_backbones["passt"], device="cpu")}, stats,
                             show_progress=False)
    note = next(n for n in res.notes if n.startswith("KL"))
    assert "KL" not in res.metrics and "pairs clips by id" in note and f"'x{IDS[0]}'" in note and f"'{IDS[0]}'" in note


def test_reference_stats_round_trip_and_bad_files(tmp_path):
    stats = tta.ReferenceStats({"openl3": (np.ones(3), np.eye(3))}, {"a": np.full(4, 0.25)}, {"openl3": "x"}, 5, "src")
    back = tta.ReferenceStats.load(stats.save(str(tmp_path / "s.npz")))
    assert back.num_clips == 5 and np.array_equal(back.fd["openl3"][1], np.eye(3)) and list(back.passt_probs) == ["a"]
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.npz: not a reference-statistics file"):
        tta.ReferenceStats.load(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="megatron_ualm.evaluate reference"):
        tta.ReferenceStats.load(str(tmp_path / "missing.npz"))


def test_inputs_are_checked(tmp_path, tiny_backbones):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "a"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: needs \"id\" and a \"prompt\""):
        tta.read_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="holds no audio files"):
        tta.list_clips(str(tmp_path / "d"))
    (tmp_path / "d" / "x.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match="x.wav: cannot decode audio"):
        tta.read_clip(str(tmp_path / "d" / "x.wav"))
    with pytest.raises(SystemExit):  # argparse: neither clips nor a model
        evaluate.parse_args(["generation", "--out", str(tmp_path), "--openl3-path", tiny_backbones["openl3"]])
    with pytest.raises(SystemExit):  # no backbone at all
        evaluate.parse_args(["generation", "--audio-dir", str(tmp_path / "d"), "--out", str(tmp_path)])


def test_markdown_table_order_and_missing_values():
    text = markdown_table({"a": {"CL": 0.5, "FD": 2.0, "AES_CE": 6.0}, "b": {"KL": 1.25}})
    head = text.splitlines()[0]
    assert head == "| system | " + " | ".join(PAPER_COLUMNS) + " | AES_CE |"
    assert text.splitlines()[2] == "| a | 2 | - | - | 0.5 | - | 6 |"


@pytest.mark.slow
def test_generate_then_evaluate(decoding_inputs, tiny_backbones, tmp_path):
    """--random-init: the debug model decodes every prompt (CFG), the clips are written and scored."""
    import subprocess
    import sys

    out = tmp_path / "gen"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "megatron_ualm.evaluate", "generation", "--random-init", "--flavor", "debug",
           "--tokenizer", decoding_inputs["tokenizer"], "--codec", decoding_inputs["codec"],
           "--prompts", decoding_inputs["prompts"], "--max-audio-seconds", "0.2", "--batch-size", "2",
           "--out", str(out), "--no-cache", *_flags(tiny_backbones, ("clap", "aesthetics"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(os.listdir(out / "audio")) == ["dog.wav", "rain.wav"]
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert m["num_clips"] == 2 and m["CL_pairs"] == 2 and np.isfinite(m["CL"]) and np.isfinite(m["AES"])


def _parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        evaluate.parse_args(argv)
    return capsys.readouterr().err


def test_paths_and_the_reference_are_checked_before_any_clip(folders, tiny_backbones, tmp_path, capsys):
    """Every backbone path and the reference are checked at parsing, before a model loads or a clip
    is generated (at scale, hours of decoding); CLAP's message reads like the others'."""
    gen = ["generation", "--audio-dir", str(folders / "gen"), "--out", str(tmp_path / "out")]
    err = _parse_error(gen + ["--clap-path", str(tmp_path / "nowhere")], capsys)
    assert "LAION-CLAP weights" in err and "do not exist" in err and "preparing the backbones" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    err = _parse_error(gen + ["--clap-path", str(tmp_path / "half")], capsys)
    assert "LAION-CLAP folder" in err and "lacks the model weights" in err and "preparing the backbones" in err
    err = _parse_error(gen + ["--passt-path", str(tmp_path / "nowhere.pt"), "--reference-dir", str(folders / "ref")],
                       capsys)
    assert "PaSST weights" in err and "do not exist" in err and "preparing the backbones" in err
    # FD and KL need reference clips: asked for up front, not a table of dashes at the end.
    err = _parse_error(gen + ["--openl3-path", tiny_backbones["openl3"], "--passt-path", tiny_backbones["passt"]], capsys)
    assert "FD and KL compare the clips with reference clips: give --reference" in err and "--reference-dir" in err
    (tmp_path / "not.npz").write_bytes(b"not an npz")
    err = _parse_error(gen + ["--openl3-path", tiny_backbones["openl3"], "--reference", str(tmp_path / "not.npz")], capsys)
    assert "is not reference statistics" in err
    (tmp_path / "empty").mkdir()
    err = _parse_error(gen + ["--openl3-path", tiny_backbones["openl3"], "--reference-dir", str(tmp_path / "empty")],
                       capsys)
    assert "--reference-dir" in err and "holds no audio files" in err
    # IS, CL and AES need no reference.
    evaluate.parse_args(gen + ["--panns-path", tiny_backbones["panns"], "--clap-path", tiny_backbones["clap"]])


def test_tiny_backbones_command_writes_usable_flags(tmp_path, capfd):
    evaluate.main(["tiny-backbones", str(tmp_path / "b")])
    flags = (tmp_path / "b" / "flags.txt").read_text().split()
    out, err = capfd.readouterr()  # also what the libraries print (tokenizers' trainer, transformers' bars)
    assert out.splitlines() == [" ".join(flags)], out
    assert "Writing model shards" not in err and err.strip().startswith("wrote tiny random backbones"), err
    assert {f for f in flags if f.startswith("--")} == {f"--{n}-path" for n in evaluate.BACKBONE_FLAGS}
    (tmp_path / "clips").mkdir()
    tiny_models.write_clips(tmp_path / "clips", ["a", "b"], seconds=0.5)
    args = evaluate.parse_args(["generation", "--audio-dir", str(tmp_path / "clips"), "--reference-dir",
                                str(tmp_path / "clips"), "--out", str(tmp_path / "o"), *flags])
    assert args.clap_path == str(tmp_path / "b" / "clap")


def test_small_sets_explain_themselves(folders, loaded_backbones, cache_dir):
    """IS with fewer clips than splits, FD from fewer embeddings than dimensions, KL pairs just below
    0 from the smoothing: notes that say why, not warnings."""
    import warnings

    models = {k: loaded_backbones[k] for k in ("openl3", "passt", "panns")}
    cache = tta.FeatureCache(cache_dir)
    files = tta.list_clips(str(folders / "ref"))
    reference = tta.compute_reference(files, models, cache, ("openl3",), show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing the user would read as an error
        res = tta.evaluate_clips(files, models, reference, cache=cache, show_progress=False)  # the clips themselves
    notes = " | ".join(res.notes)
    assert "IS: 6 clips, fewer than the standard 10 splits" in notes and res.metrics["IS"] == pytest.approx(1.0)
    assert "singular covariance" in notes
    assert res.metrics["KL"] <= 0 and "slightly negative" in notes and "1e-6" in notes
