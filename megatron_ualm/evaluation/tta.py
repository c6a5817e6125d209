"""Text-to-audio metrics over a folder of clips: FD (OpenL3; also PANNs / CLAP when asked), KL
(PaSST), IS (PANNs), CL (LAION-CLAP) and AES (AudioBox-Aesthetics).

A clip's id is its file stem (the ``_0`` that ``megatron_ualm.generate`` appends to the first
audio of a reply is dropped). KL pairs each generated clip with the reference clip of the same
id; CL pairs it with the prompt of that id. Reference statistics (FD means / covariances, PaSST
class posteriors per id) are computed once from a reference folder with ``compute_reference``
and saved to one ``.npz``; per-file backbone outputs are cached under ``cache_dir`` keyed by the
file's path, size and mtime and the backbone's identity (weights digest and options).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_ualm.evaluation import metrics
from megatron_ualm.evaluation.backbones import BACKBONES, Backbone
from megatron_ualm.files import atomic_file, read_jsonl
from megatron_ualm.progress import progress_bar

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
# Where each FD backbone's embedding lives in its per-clip outputs.
FD_FEATURES = {"openl3": "openl3", "panns": "panns_embedding", "clap": "clap_audio"}
GENERATE_SUFFIX = "_0"


def read_clip(path: str) -> tuple[np.ndarray, int]:
    """Decodes a file to mono float32 at its own rate; a one-line error names a bad file."""
    import soundfile as sf

    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile's errors name neither the file nor the cause well
        raise ValueError(f"{path}: cannot decode audio ({type(err).__name__}: {err})") from None
    if wave.shape[0] == 0:
        raise ValueError(f"{path}: the clip is empty")
    return wave.mean(axis=1), int(sr)


def list_clips(folder: str) -> dict[str, str]:
    """``{id: path}`` of the audio files in ``folder`` (not recursive), sorted by id."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"audio folder {folder} does not exist")
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in AUDIO_EXTENSIONS:
            continue
        if stem.endswith(GENERATE_SUFFIX) and len(stem) > len(GENERATE_SUFFIX):
            stem = stem[: -len(GENERATE_SUFFIX)]
        if stem in out:
            raise ValueError(f"{folder}: two files have the clip id {stem!r} ({os.path.basename(out[stem])}, {name})")
        out[stem] = os.path.join(folder, name)
    if not out:
        raise ValueError(f"{folder} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return out


def read_prompts(path: str) -> dict[str, str]:
    """``{id: prompt}`` from a JSONL file of ``{"id": ..., "prompt": ...}`` records."""
    out: dict[str, str] = {}
    for n, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or "id" not in rec:
            raise ValueError(f'{path}:{n}: needs "id" and a "prompt" string, e.g. {{"id": "a1", "prompt": "rain on a roof"}}')
        if str(rec["id"]) in out:
            raise ValueError(f"{path}:{n}: id {rec['id']!r} appears twice")
        out[str(rec["id"])] = rec["prompt"]
    return out


class FeatureCache:
    """Backbone outputs per file on disk, keyed by (path, size, mtime, backbone identity).

    Args:
        root: cache folder; None disables caching.
    """

    def __init__(self, root: Optional[str]) -> None:
        self.root = root

    def _file(self, path: str, identity: str) -> Optional[str]:
        if self.root is None:
            return None
        st = os.stat(path)
        key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        return os.path.join(self.root, identity, key[:2], key + ".npz")

    def get(self, path: str, identity: str) -> Optional[dict]:
        f = self._file(path, identity)
        if f is None or not os.path.isfile(f):
            return None
        try:
            with np.load(f) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):  # a torn or foreign file: recompute
            return None

    def put(self, path: str, identity: str, features: dict) -> None:
        f = self._file(path, identity)
        if f is None:
            return
        with atomic_file(f) as tmp:
            np.savez(tmp, **features)


def extract(files: dict[str, str], models: dict[str, Backbone], cache: FeatureCache, chunk: int = 32,
            show_progress: bool = True, desc: str = "clips") -> dict[str, dict[str, dict]]:
    """Runs every backbone on every file (each file decoded once; cached outputs reused).

    Returns:
        ``{backbone name: {clip id: outputs}}``.
    """
    ids = list(files)
    out: dict[str, dict[str, dict]] = {name: {} for name in models}
    identities = {name: m.identity for name, m in models.items()}
    with progress_bar(len(ids), desc, "clip", show_progress) as bar:
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            todo = {}
            for name in models:
                for i in part:
                    hit = cache.get(files[i], identities[name])
                    if hit is not None:
                        out[name][i] = hit
                    else:
                        todo.setdefault(name, []).append(i)
            need = sorted({i for v in todo.values() for i in v}, key=part.index)
            clips = {i: read_clip(files[i]) for i in need}
            for name, want in todo.items():
                # Clips of one rate go together (each backbone resamples from that rate).
                by_rate: dict[int, list[str]] = {}
                for i in want:
                    by_rate.setdefault(clips[i][1], []).append(i)
                for sr, group in by_rate.items():
                    for i, feats in zip(group, models[name].features([clips[i][0] for i in group], sr)):
                        out[name][i] = feats
                        cache.put(files[i], identities[name], feats)
            bar.update(len(part))
    return out


@dataclass
class ReferenceStats:
    """What the metrics need from a reference set, computed once and saved.

    Attributes:
        fd: ``{backbone: (mu [d], sigma [d, d])}``.
        passt_probs: ``{clip id: softmax of the clip's PaSST logits [C]}`` (KL pairs).
        identities: ``{backbone: identity}`` of the backbones that computed them.
        num_clips: clips in the reference set.
        source: the reference folder.
    """

    fd: dict = field(default_factory=dict)
    passt_probs: dict = field(default_factory=dict)
    identities: dict = field(default_factory=dict)
    num_clips: int = 0
    source: str = ""

    def save(self, path: str) -> str:
        """Writes one ``.npz`` (atomically: a temp file renamed into place)."""
        arrays = {}
        for name, (mu, sigma) in self.fd.items():
            arrays[f"fd_{name}_mu"], arrays[f"fd_{name}_sigma"] = mu, sigma
        if self.passt_probs:
            ids = list(self.passt_probs)
            arrays["passt_ids"] = np.array(ids)
            arrays["passt_probs"] = np.stack([self.passt_probs[i] for i in ids])
        meta = {"identities": self.identities, "num_clips": self.num_clips, "source": self.source, "format": 1}
        arrays["meta"] = np.array(json.dumps(meta))
        with atomic_file(path) as tmp:
            np.savez(tmp, **arrays)
        return path

    @classmethod
    def load(cls, path: str) -> "ReferenceStats":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference statistics {path} do not exist (write them with "
                                    "`python -m megatron_ualm.evaluate reference`)")
        try:
            with np.load(path) as z:
                meta = json.loads(str(z["meta"]))
                fd = {k[3:-3]: (z[k], z[k[:-3] + "_sigma"]) for k in z.files if k.startswith("fd_") and k.endswith("_mu")}
                probs = dict(zip([str(i) for i in z["passt_ids"]], z["passt_probs"])) if "passt_ids" in z.files else {}
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(f"{path}: not a reference-statistics file ({type(err).__name__}: {err})") from None
        return cls(fd, probs, meta["identities"], meta["num_clips"], meta.get("source", ""))


def compute_reference(files: dict[str, str], models: dict[str, Backbone], cache: FeatureCache,
                      fd_backbones: Sequence[str] = ("openl3",), show_progress: bool = True,
                      source: str = "") -> ReferenceStats:
    """Reference statistics of a set of clips.

    Args:
        files: ``{clip id: path}``.
        models: loaded backbones by name (those of ``fd_backbones`` and ``passt`` are used).
        cache: per-file feature cache.
        fd_backbones: backbones whose embedding statistics are kept.
        show_progress: draw a progress bar.
        source: recorded in the file (the reference folder).
    """
    use = {n: m for n, m in models.items() if n in fd_backbones or n == "passt"}
    feats = extract(files, use, cache, show_progress=show_progress, desc="reference")
    stats = ReferenceStats(identities={n: m.identity for n, m in use.items()}, num_clips=len(files), source=source)
    for name in fd_backbones:
        if name in use:
            stats.fd[name] = metrics.embedding_statistics(_stack_embeddings(feats[name], FD_FEATURES[name]))
    if "passt" in use:
        stats.passt_probs = {i: metrics.softmax(f["passt_logits"][None])[0] for i, f in feats["passt"].items()}
    return stats


def _stack_embeddings(per_clip: dict, key: str) -> np.ndarray:
    """``[n, d]``: every clip's embedding, or every frame's for frame-level backbones (OpenL3)."""
    return np.concatenate([np.atleast_2d(f[key]) for f in per_clip.values()], axis=0)


@dataclass
class GenerationResult:
    """Set-level metrics, per-clip rows and notes on what could not be computed."""

    metrics: dict
    rows: list
    notes: list


def evaluate_clips(files: dict[str, str], models: dict[str, Backbone], reference: Optional[ReferenceStats] = None,
                   prompts: Optional[dict[str, str]] = None, cache: Optional[FeatureCache] = None,
                   fd_backbones: Sequence[str] = ("openl3",), show_progress: bool = True,
                   log: Callable[[str], None] = lambda s: None) -> GenerationResult:
    """Computes FD / KL / IS / CL / AES for the clips whose backbones are loaded.

    Args:
        files: ``{clip id: path}`` of the generated clips.
        models: loaded backbones by name (``openl3``, ``passt``, ``panns``, ``clap``, ``aesthetics``).
        reference: reference statistics (FD and KL need them).
        prompts: ``{clip id: prompt}`` (CL needs them).
        cache: per-file feature cache (None: no cache).
        fd_backbones: FD is computed on each of these (``openl3`` is the paper's FD).
        show_progress: draw a progress bar.
        log: receives a line per metric that had to be skipped.

    Returns:
        Metrics keyed ``FD`` (OpenL3), ``FD_panns`` / ``FD_clap``, ``KL``, ``IS`` / ``IS_std``,
        ``CL``, ``AES`` and ``AES_CE`` ... ``AES_PQ``; per-clip rows; notes.
    """
    cache = cache or FeatureCache(None)
    feats = extract(files, models, cache, show_progress=show_progress, desc="evaluating")
    out: dict = {"num_clips": len(files)}
    rows = {i: {"id": i, "file": os.path.basename(p)} for i, p in files.items()}
    notes: list[str] = []

    def skip(msg: str) -> None:
        notes.append(msg)
        log(msg)

    def explain(msg: str) -> None:  # a number that needs reading with care, not an error
        notes.append(msg)
        log(f"note: {msg}")

    for name in fd_backbones:
        key = "FD" if name == "openl3" else f"FD_{name}"
        if name not in feats:
            continue  # the backbone was not asked for
        if reference is None or name not in reference.fd:
            skip(f"{key}: the reference statistics hold no {name} embeddings")
        elif reference.identities.get(name) != models[name].identity:
            skip(f"{key}: the reference statistics were computed with another {name} checkpoint or options "
                 f"({reference.identities.get(name)} vs {models[name].identity}); recompute them")
        else:
            embeddings = _stack_embeddings(feats[name], FD_FEATURES[name])
            mu, sigma = metrics.embedding_statistics(embeddings)
            with warnings.catch_warnings(record=True) as caught:  # scipy's sqrtm on a singular product
                warnings.simplefilter("always")
                out[key] = metrics.frechet_distance(mu, sigma, *reference.fd[name])
            n, d = embeddings.shape
            if n <= d or caught:
                explain(f"{key}: {n} embeddings ({len(files)} clips) of dimension {d} give a singular covariance "
                        f"(rank below {d}), so FD mostly measures the small sample; compare FD only between sets of "
                        "well over d embeddings (the test sets have thousands)")
    if "passt" in feats:
        if reference is None or not reference.passt_probs:
            skip("KL: the reference statistics hold no PaSST posteriors")
        elif reference.identities.get("passt") != models["passt"].identity:
            skip("KL: the reference posteriors were computed with another PaSST checkpoint; recompute them")
        else:
            paired = [i for i in files if i in reference.passt_probs]
            if not paired:
                skip(f"KL: no generated clip id matches a reference clip id (KL pairs clips by id: a prompt's "
                     f"\"id\" with the reference file of that stem, e.g. {next(iter(files))!r} with "
                     f"{next(iter(files))}.wav; the reference has e.g. {next(iter(reference.passt_probs))!r})")
            else:
                gen = metrics.softmax(np.stack([feats["passt"][i]["passt_logits"] for i in paired]))
                kl = metrics.kl_divergence(gen, np.stack([reference.passt_probs[i] for i in paired]))
                for i, v in zip(paired, kl):
                    rows[i]["kl"] = float(v)
                out["KL"], out["KL_pairs"] = float(kl.mean()), len(paired)
                if (kl < 0).any():
                    explain(f"KL: {int((kl < 0).sum())} of {len(paired)} pairs are slightly negative (down to "
                            f"{kl.min():.2g}): the reference posteriors are smoothed by 1e-6 before the log, as "
                            "stable-audio-metrics does, so a clip whose classes match its reference almost exactly "
                            "scores just below 0")
    if "panns" in feats:
        logits = np.stack([feats["panns"][i]["panns_logits"] for i in files])
        splits = min(10, len(files))
        out["IS"], out["IS_std"] = metrics.inception_score(logits, splits=splits)
        out["IS_splits"] = splits
        if len(files) < 10:
            explain(f"IS: {len(files)} clips, fewer than the standard 10 splits: each split holds one clip, whose IS "
                    "is exactly 1; the test sets have about a thousand clips")
        elif len(files) < 100:
            explain(f"IS: {len(files)} clips in 10 splits of about {len(files) // 10}: IS grows with the clips per "
                    "split, so it compares only with sets of the same size (the test sets put about a hundred in each)")
    if "clap" in feats:
        with_prompt = [i for i in files if prompts and i in prompts]
        if not with_prompt:
            skip("CL: no prompts for the clips (give --prompts with their ids)")
        else:
            audio = np.stack([feats["clap"][i]["clap_audio"] for i in with_prompt])
            scores = metrics.clap_score(audio, models["clap"].text_embeddings([prompts[i] for i in with_prompt]))
            for i, v in zip(with_prompt, scores):
                rows[i]["clap"] = float(v)
            out["CL"], out["CL_pairs"] = float(scores.mean()), len(with_prompt)
    if "aesthetics" in feats:
        axes = models["aesthetics"].outputs
        for i in files:
            vals = [float(feats["aesthetics"][i][k]) for k in axes]
            rows[i].update(dict(zip(axes, vals)), aes=float(np.mean(vals)))
        for k in axes:
            out[k.upper()] = float(np.mean([rows[i][k] for i in files]))
        out["AES"] = float(np.mean([rows[i]["aes"] for i in files]))
    if prompts:
        for i in files:
            if i in prompts:
                rows[i]["prompt"] = prompts[i]
    return GenerationResult(out, list(rows.values()), notes)


def load_backbones(paths: dict[str, Optional[str]], device: Optional[str] = None, **options) -> dict[str, Backbone]:
    """Loads the backbones whose path is given (``{name: path or None}``)."""
    return {name: BACKBONES[name](p, device=device, **options.get(name, {})) for name, p in paths.items() if p}
