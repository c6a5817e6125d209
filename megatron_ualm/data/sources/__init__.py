"""Corpora as they ship, read in place by every preprocessing tool.

Formats (``--input-format``, detected from the inputs when ``auto``):

==============  ============================================  =================================
format          inputs                                        unit a task owns
==============  ============================================  =================================
``manifest``    JSONL / Parquet manifests (the tools' own)    records (shard by shard)
``webdataset``  tar shards, globs and ``{000000..000099}``    one tar (``tar.py``)
``lhotse``      CutSet manifests (``cuts.jsonl.gz``)          records (``lhotse_cuts.py``)
``lhotse-shar`` Shar directories                              one Shar shard
``hf-parquet``  Hugging Face Parquet with an audio struct     one row group (``parquet.py``)
``wavcaps``     JSON metadata + ``--audio-root`` folder/zip   records (``wavcaps.py``)
==============  ============================================  =================================

``--field TARGET=EXPRESSION`` / ``--fields-file`` / ``--preset`` map the format's fields to the
record the family's converter reads (``fields.py``). ``layout.py`` cuts shards from units so that
N tasks read disjoint units and their union is a one-task run byte for byte. Without a format
other than ``manifest`` and without mappings the tools read manifests exactly as before.

This package imports no heavy module at import time (``--help`` answers at once); ``lhotse``
and ``pyarrow`` load when a corpus of theirs is opened.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib
import json
import os
import textwrap
from typing import Optional

from megatron_ualm.data.sources.base import Corpus, CorpusError, LazyRecord, expand_inputs, materialize
from megatron_ualm.data.sources.fields import PRESETS, FieldError, build_field_map, describe_presets

__all__ = ["Corpus", "CorpusError", "FieldError", "LazyRecord", "FORMATS", "add_corpus_arguments",
           "detect_format", "expand_inputs", "materialize", "open_corpus"]

FORMATS = {
    "manifest": "megatron_ualm.data.sources.manifest:ManifestCorpus",
    "webdataset": "megatron_ualm.data.sources.tar:WebDatasetCorpus",
    "lhotse": "megatron_ualm.data.sources.lhotse_cuts:LhotseCutsCorpus",
    "lhotse-shar": "megatron_ualm.data.sources.lhotse_cuts:LhotseSharCorpus",
    "hf-parquet": "megatron_ualm.data.sources.parquet:HFParquetCorpus",
    "wavcaps": "megatron_ualm.data.sources.wavcaps:WavCapsCorpus",
}
"""``--input-format`` name -> reader class (imported when used)."""


def _looks_like_cuts(path: str) -> bool:
    """A (gzipped) JSONL whose first entry is a Lhotse cut (``"type": "MonoCut"`` ...)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        entry = json.loads(first) if first else {}
    except (OSError, EOFError, ValueError):
        return False
    return isinstance(entry, dict) and str(entry.get("type", "")).endswith("Cut")


def detect_format(path: str) -> str:
    """The format one input looks like (``auto``); Parquet and JSON stay ``manifest``, since Hub
    Parquet and WavCaps JSON are told apart from manifests only by ``--input-format`` or ``--preset``."""
    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        if glob.glob(os.path.join(glob.escape(path), "cuts.*.jsonl*")):
            return "lhotse-shar"
        # A folder of tars: the WebDataset reader says how to name them.
        return "webdataset" if glob.glob(os.path.join(glob.escape(path), "*.tar")) else "manifest"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith((".jsonl.gz", ".jsonl")) and _looks_like_cuts(path):
        return "lhotse"
    return "manifest"


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """``--input-format``, ``--field``, ``--fields-file``, ``--preset`` (every preprocessing tool)."""
    presets = "; ".join(describe_presets())
    group = parser.add_argument_group("corpus formats", textwrap.fill(
        "Read corpora as they ship, without extracting or converting them: WebDataset tars, Lhotse cut "
        "manifests and Shar directories, Hugging Face Parquet, WavCaps JSON + audio folder or zip. Field "
        "mappings say which field holds the caption, transcript, question / answer or clip span; bad samples "
        "(truncated archives, missing members, undecodable audio, a mapping that finds nothing) go to the "
        "rejected list with the archive and key, or the manifest line and cut id.", 88))
    group.add_argument("--input-format", choices=("auto", *FORMATS), default="auto",
                       help="auto (default): .tar -> webdataset, a directory with cuts.*.jsonl.gz -> lhotse-shar, "
                            "a JSONL(.gz) of Lhotse cuts -> lhotse, else manifest (JSONL / Parquet); hf-parquet (row groups as "
                            "units, any column names) and wavcaps (JSON metadata, audio in --audio-root, a folder "
                            "or .zip) are chosen by this flag or a --preset")
    group.add_argument("--field", action="append", default=[], metavar="TARGET=EXPR",
                       help="take record field TARGET from the sample's EXPR, e.g. caption=json.caption, "
                            "caption=supervisions[0].text, transcript=supervisions[*].text (joined), "
                            "caption=json.text[0]|json.text (first found), start=json.start? (optional), "
                            "question='\"Describe the sound.\"' (a JSON string for every record). Targets: audio, "
                            "start, end, caption, rich_caption, codes, transcript (generation); audio, start, end, "
                            "question, answer, conversations, messages, transcript (understanding); any (dotted) "
                            "record field (chat, preferences). Repeatable; overrides --fields-file and --preset")
    group.add_argument("--fields-file", metavar="FILE",
                       help='a JSON object of mappings, e.g. {"caption": "json.text[0]", "start": "json.start?"}')
    group.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME",
                       help=f"mappings (and format) of a common corpus: {presets}")


def open_corpus(args: argparse.Namespace, family: str) -> Optional[Corpus]:
    """The reader for the command's inputs, or None for manifests read as before (no mapping).

    Args:
        args: parsed arguments (``--input``, ``add_corpus_arguments``' flags, ``--audio-root``).
        family: the data family (the preset's mappings and the record assembly depend on it).

    Raises:
        CorpusError: inputs that match nothing, mix formats, or do not fit the format.
        FieldError: a malformed mapping or an unknown preset.
    """
    fields = build_field_map(args.field, args.fields_file, args.preset, family)
    fmt = args.input_format
    if fmt == "auto":
        # A plain path that does not exist is left to the manifest reader, which names it.
        plain = [p for p in args.input if not glob.has_magic(p) and "{" not in p and not os.path.exists(p)]
        found = {p: detect_format(p) for p in expand_inputs([p for p in args.input if p not in plain])}
        found.update({p: "manifest" for p in plain})
        kinds = sorted(set(found.values()))
        if len(kinds) > 1:
            example = ", ".join(f"{p}: {k}" for k, p in {k: p for p, k in found.items()}.items())
            raise CorpusError(f"--input mixes formats ({example}); one run reads one format, so preprocess each "
                              "into its own --output (build_blend combines them)")
        fmt = kinds[0] if kinds else "manifest"
        if args.preset is not None:
            formats = PRESETS[args.preset].formats
            if fmt == "manifest":
                fmt = formats[0]
            elif fmt not in formats:
                raise CorpusError(f"--preset {args.preset} reads {' or '.join(formats)} input, but --input looks "
                                  f"like {fmt}; give --input-format if it is not")
    if fmt == "manifest" and not fields.fields:
        return None
    audio_root = getattr(args, "audio_root", None)
    if fmt == "wavcaps" and not audio_root:
        raise CorpusError("--input-format wavcaps needs --audio-root: the folder or .zip holding the audio files")
    root = os.path.abspath(audio_root or os.path.dirname(os.path.abspath(args.input[0])))
    module, _, name = FORMATS[fmt].partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(args.input, fields, family, root)

