"""Hugging Face Qwen2.5 (+ audio encoder) -> UALM Megatron checkpoint, one unit at a time.

Initialisation rule for what a text LM does not have (seeded; every tensor draws from its own
``torch.Generator`` seeded with ``seed`` and the tensor's name, so the result does not depend on
the order of conversion):

* stream-0 embedding and text head, rows ``[0, text_vocab_size)``: copied from the HF model;
* special-token rows ``[text_vocab_size, text_vocab_size + 32)``: the mean of the text rows of the
  same table plus ``N(0, (0.1 * s)^2)`` noise, ``s`` the standard deviation of the text rows;
* padding rows after the specials: copied where the HF table has them, else zero;
* codebook embeddings ``[K * card, h]``: ``N(0, s_emb^2)``, ``s_emb`` the std of the text embedding rows;
* RVQ heads ``[K, card, h]``: ``N(0, s_out^2)``, ``s_out`` the std of the text head rows (the
  embedding's for tied models);
* adapter: weights ``N(0, init_method_std^2)`` (0.02), biases zero;
* audio encoder: copied from ``--audio-encoder``; without one, the ``transformers`` random init
  under ``torch.manual_seed(seed)`` (a warning says so: train with a pretrained encoder).

A directory written by the exporter (it has ``ualm_config.json``) re-imports every tensor as
it was, specials, codebooks, heads, adapter and encoder included.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from typing import Any, Dict, Optional

import torch
from tqdm import tqdm

from megatron_ualm.config import NUM_RESERVED_SPECIAL_TOKENS, UALMConfig, make_config
from megatron_ualm import checkpoint_format
from megatron_ualm.conversion import configs, layout
from megatron_ualm.conversion.hf_io import ConversionError, SafetensorsReader, read_json
from megatron_ualm.conversion.megatron_io import (
    StreamingCheckpointWriter,
    Unit,
    model_units,
    quiet_megatron_logs,
    structure_model,
)

log = logging.getLogger(__name__)

UALM_CONFIG_FILE = "ualm_config.json"
UALM_AUDIO_FILE = "ualm_audio.safetensors"
ENCODER_SUBDIR = "audio_encoder"
_ENCODER_PREFIXES = ("", "model.encoder.", "encoder.", "audio_tower.", "model.audio_tower.")
NOISE_SCALE = 0.1


def generator(seed: int, name: str) -> torch.Generator:
    """The generator of one initialised tensor: seeded by ``seed`` and the tensor's name."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def row_stats(table: torch.Tensor, rows: int, chunk: int = 8192) -> tuple[torch.Tensor, float]:
    """Mean row ``[h]`` (float32) and scalar std of ``table[:rows]``, accumulated in float64 by chunks."""
    total = torch.zeros(table.shape[1], dtype=torch.float64)
    sq = 0.0
    for lo in range(0, rows, chunk):
        block = table[lo:min(rows, lo + chunk)].double()
        total += block.sum(0)
        sq += block.square().sum().item()
    mean = total / rows
    n = rows * table.shape[1]
    var = sq / n - (total.sum().item() / n) ** 2
    return mean.float(), max(var, 0.0) ** 0.5


class _Source:
    """Produces the tensors of each unit for a plain HF Qwen2 (+ encoder) directory."""

    def __init__(self, config: UALMConfig, hf: SafetensorsReader, seed: int,
                 encoder: Optional[SafetensorsReader], encoder_prefix: str,
                 parts: Optional[SafetensorsReader] = None):
        self.config = config
        self.hf = hf
        self.seed = seed
        self.encoder = encoder
        self.encoder_prefix = encoder_prefix
        self.parts = parts  # ualm_audio.safetensors of an exported directory
        self._stats: Dict[str, tuple] = {}
        self._random_encoder: Optional[Dict[str, torch.Tensor]] = None

    # Stream-0 tables.
    def _hf_table_name(self, which: str) -> str:
        if which == "output" and not self.config.share_embeddings_and_output_weights:
            return "lm_head.weight"
        return "model.embed_tokens.weight"

    def stats(self, which: str) -> tuple:
        name = self._hf_table_name(which)
        if name not in self._stats:
            self._stats[name] = row_stats(self.hf.get(name), self.config.text_vocab_size)
        return self._stats[name]

    def table(self, which: str, dtype: torch.dtype) -> torch.Tensor:
        """Stream-0 embedding (``which="embedding"``) or text head (``"output"``), ``[V, h]``."""
        c = self.config
        name = self._hf_table_name(which)
        src = self.hf.get(name)
        V, T, h = c.vocab_size, c.text_vocab_size, c.hidden_size
        if src.dim() != 2 or src.shape[1] != h or src.shape[0] < T:
            raise ConversionError(
                f"{name} in {self.hf.directory} has shape {tuple(src.shape)}; expected [rows >= text_vocab_size={T}, "
                f"hidden_size={h}]"
            )
        if self.parts is not None:  # an exported UALM model: every row is ours already
            if src.shape[0] != V:
                raise ConversionError(f"{name} has {src.shape[0]} rows, expected vocab_size={V}")
            return src.to(dtype)
        out = torch.zeros(V, h, dtype=dtype)
        out[:T] = src[:T].to(dtype)
        mean, std = self.stats(which)
        S = NUM_RESERVED_SPECIAL_TOKENS
        noise = torch.randn(S, h, generator=generator(self.seed, f"{name}:specials")) * (NOISE_SCALE * std)
        out[T:T + S] = (mean + noise).to(dtype)
        keep = min(V, src.shape[0])
        if keep > T + S:
            out[T + S:keep] = src[T + S:keep].to(dtype)
        return out

    def normal(self, name: str, shape, std: float, dtype: torch.dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator(self.seed, name)) * std).to(dtype)

    def part(self, name: str, shape) -> torch.Tensor:
        return self.parts.get(name, shape)

    def encoder_tensor(self, rel: str, shape) -> torch.Tensor:
        if self.encoder is not None:
            return self.encoder.get(self.encoder_prefix + rel, shape)
        if self._random_encoder is None:
            from megatron_ualm.models.encoder import _encoder_classes

            log.warning(
                "no --audio-encoder given: the audio encoder gets a random init (seed %d); "
                "understanding needs a pretrained encoder", self.seed,
            )
            model_cls, config_cls, _ = _encoder_classes(self.config.audio_encoder_type)
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                self._random_encoder = model_cls(config_cls(**self.config.audio_encoder_config)).state_dict()
        return self._random_encoder[rel]

    def unit(self, name: str, unit: Unit) -> Dict[str, torch.Tensor]:
        c = self.config
        out: Dict[str, torch.Tensor] = {}
        for key, slot in unit.slots.items():
            tensor = self.tensor(key, slot.shape, slot.dtype)
            if tensor is not None:
                out[key] = tensor
        if name.startswith("decoder.layers."):
            i = int(name.split(".")[2])
            hf = {rel: self.hf.get(f"model.layers.{i}.{rel}") for rel in layout.HF_LAYER_NAMES}
            meg = layout.hf_layer_to_megatron(hf, c.num_attention_heads, c.num_query_groups)
            for rel, tensor in meg.items():
                key = f"{name}.{rel}"
                if key not in unit.slots:
                    raise ConversionError(f"the UALM model has no {key}")
                if tuple(tensor.shape) != unit.slots[key].shape:
                    raise ConversionError(
                        f"layer {i} of {self.hf.directory}: {rel} has shape {tuple(tensor.shape)} after the layout "
                        f"change, expected {unit.slots[key].shape}"
                    )
                out[key] = tensor.to(unit.slots[key].dtype)
        return out

    def tensor(self, key: str, shape, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """One tensor by its state-dict name (decoder layers are filled by ``unit``)."""
        c = self.config
        if key == "embedding.word_embeddings.weight":
            return self.table("embedding", dtype)
        if key == "output_layer.weight":
            return self.table("output", dtype)
        if key == "decoder.final_layernorm.weight":
            return self.hf.get("model.norm.weight", shape).to(dtype)
        if key.startswith("decoder.layers."):
            return None
        if self.parts is not None and not key.startswith("audio_encoder."):
            return self.part(key.removeprefix("embedding."), shape).to(dtype)
        if key == "embedding.codebook_embeddings.weight":
            return self.normal(key, shape, self.stats("embedding")[1], dtype)
        if key == "codebook_heads.weight":
            return self.normal(key, shape, self.stats("output")[1], dtype)
        if key.startswith("audio_adapter."):
            if key.endswith(".bias"):
                return torch.zeros(shape, dtype=dtype)
            return self.normal(key, shape, c.init_method_std, dtype)
        if key.startswith("audio_encoder.model."):
            return self.encoder_tensor(key[len("audio_encoder.model."):], shape).to(dtype)
        raise ConversionError(f"no conversion rule for {key}")


def _encoder_prefix(reader: SafetensorsReader, probe: str, preferred: str) -> str:
    for prefix in (preferred, *_ENCODER_PREFIXES):
        if prefix + probe in reader:
            return prefix
    raise ConversionError(
        f"{reader.directory} holds no encoder weight {probe!r} under any of the prefixes {list(_ENCODER_PREFIXES)}"
    )


def codec_identity(codec: Optional[str], config: UALMConfig) -> Optional[Dict[str, Any]]:
    """What the checkpoint records about the codec whose codes it reads and writes.

    A local directory is checked against the model (codebook size, number of quantizers where
    its ``config.json`` says); anything else is recorded as a name (e.g. ``hf-audio/xcodec-hubert-general``).
    """
    if codec is None:
        return None
    ident: Dict[str, Any] = dict(name=codec, num_codebooks=config.num_codebooks,
                                 codebook_size=config.codebook_size, frame_rate=config.codec_frame_rate)
    cfg_path = os.path.join(codec, "config.json")
    if os.path.isdir(codec):
        hf = read_json(cfg_path)
        ident.update(name=os.path.abspath(codec), model_type=hf.get("model_type"))
        size = hf.get("codebook_size")
        if size is not None and size != config.codebook_size:
            raise ConversionError(f"{cfg_path}: codebook_size={size}, but the model has codebook_size={config.codebook_size}")
    return ident


def _hf_tokenizer(hf_dir: str):
    """The ``TextTokenizer`` of a HF directory's ``tokenizer.json``, None when it has none."""
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return None
    from megatron_ualm.data.tokenizer import TextTokenizer

    return TextTokenizer(hf_dir)


def text_vocabulary(arch: Dict[str, Any], flavor: str, tokenizer, requested: Optional[int], hf_dir: str) -> int:
    """Where the 32 UALM special tokens start: the text tokenizer's size.

    Taken from ``--text-vocab-size``, else the tokenizer in ``hf_dir`` (ids incl. its added
    tokens), else a named flavor's (Qwen2.5: 151665). Rows below it are the tokenizer's, trained:
    a special row must never land on one, so a requested size below the tokenizer's is refused.

    Raises:
        ConversionError: the size is unknown (``--flavor hf`` without a tokenizer), below the
            tokenizer's, or beyond the HF embedding.
    """
    known = tokenizer.vocab_size if tokenizer is not None else None
    if requested is not None:
        if known is not None and requested < known:
            raise ConversionError(
                f"--text-vocab-size {requested} would put UALM special tokens on rows {requested}..{known - 1}, which "
                f"the tokenizer in {hf_dir} ({known} ids) uses and the model has trained; use --text-vocab-size {known}")
        size = requested
    elif known is not None:
        size = known
    elif flavor != "hf":
        size = make_config(flavor, transformer_impl="local").text_vocab_size
        log.warning("%s has no tokenizer.json: the specials start at the flavor's text vocabulary size %d", hf_dir, size)
    else:
        raise ConversionError(
            f"--flavor hf takes the text vocabulary from the tokenizer, but {hf_dir} has no tokenizer.json: copy the "
            "model's tokenizer files there, or pass --text-vocab-size N (N = the tokenizer's number of ids)")
    if size > arch["vocab_size"]:
        raise ConversionError(f"{hf_dir}/config.json: vocab_size={arch['vocab_size']} rows cannot hold a text vocabulary "
                              f"of {size} ids; is this the right tokenizer?")
    return size


def stream0_rows(hf_rows: int, text_vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Rows of the stream-0 table for HF shapes: the HF rows, grown when the specials do not fit.

    Grown tables are padded to a multiple of ``multiple`` (and of ``tp``), as Megatron pads
    vocabularies; the new rows beyond the specials are zero.
    """
    needed = max(hf_rows, text_vocab_size + NUM_RESERVED_SPECIAL_TOKENS)
    if needed == hf_rows and hf_rows % tp == 0:
        return hf_rows
    step = multiple * tp // math.gcd(multiple, tp)
    return -(-needed // step) * step


def import_hf(
    hf_dir: str,
    output: str,
    *,
    flavor: str = "auto",
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    text_vocab_size: Optional[int] = None,
    dtype: Optional[str] = None,
    audio_encoder: Optional[str] = None,
    no_audio_encoder: bool = False,
    codec: Optional[str] = None,
    seed: int = 0,
    overrides: Optional[Dict[str, Any]] = None,
    progress: bool = True,
) -> str:
    """Converts a HF Qwen2.5 directory into a UALM Megatron checkpoint.

    Args:
        hf_dir: ``save_pretrained`` directory of a ``Qwen2ForCausalLM`` (safetensors), or one
            written by ``export_hf``.
        output: the ``--load`` directory to create.
        flavor: ``auto`` (find the flavor from ``config.json``), a flavor name (checked), or
            ``hf`` (shapes from ``config.json``).
        tensor_model_parallel_size: TP the checkpoint is meant for (checked; the file loads at any).
        pipeline_model_parallel_size: PP likewise.
        text_vocab_size: tokenizer size; default: the tokenizer in ``hf_dir``, else the flavor's
            (151665 for Qwen2.5). Refused when below the tokenizer's (specials on trained rows).
        dtype: ``bfloat16`` / ``float16`` / ``float32`` (default: the HF ``config.json`` dtype).
        audio_encoder: encoder directory (Qwen2-Audio / AF3 / Whisper) to copy into the checkpoint.
        no_audio_encoder: build the model without the audio-in path.
        codec: codec name or local directory, recorded (and checked when local).
        seed: seed of the initialisation rule (module docstring).
        overrides: further ``UALMConfig`` fields (``num_codebooks``, ``codebook_size``, ...).
        progress: show a progress bar.

    Returns:
        The checkpoint directory (``output/release``).
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    arch = configs.hf_arch(hf_dir)
    exported_path = os.path.join(hf_dir, UALM_CONFIG_FILE)
    parts = encoder_reader = None
    encoder_prefix = ""
    if os.path.isfile(exported_path):
        exported = read_json(exported_path)
        description = exported.get("description") or exported["record"]  # "record": exports before 2026-12
        fields = dict(overrides or {})
        if dtype:
            fields["params_dtype"] = checkpoint_format.DTYPES[dtype]
        config = checkpoint_format.config_from_description(description, **fields)
        flavor = description["flavor"]
        parts = SafetensorsReader.from_file(os.path.join(hf_dir, UALM_AUDIO_FILE))
        if config.audio_encoder_type is not None:
            encoder_reader = SafetensorsReader(os.path.join(hf_dir, ENCODER_SUBDIR))
        codec_description = description.get("codec")
        tokenizer = _hf_tokenizer(hf_dir)
        if tokenizer is not None:
            checkpoint_format.check_tokenizer(description, tokenizer.identity(), exported_path, str(tokenizer.path))
    else:
        flavor = configs.resolve_flavor(arch, flavor, os.path.join(hf_dir, "config.json"))
        fields = dict(overrides or {})
        tokenizer = _hf_tokenizer(hf_dir)
        fields["text_vocab_size"] = text_vocabulary(arch, flavor, tokenizer, text_vocab_size, hf_dir)
        if flavor == "hf":
            fields["vocab_size"] = stream0_rows(arch["vocab_size"], fields["text_vocab_size"], tp)
        if no_audio_encoder:
            fields["audio_encoder_type"] = None
        elif audio_encoder is not None:
            kind, enc_cfg, encoder_prefix = configs.encoder_info(audio_encoder)
            fields.update(audio_encoder_type=kind, audio_encoder_config=enc_cfg)
            encoder_reader = SafetensorsReader(audio_encoder)
        fields["params_dtype"] = checkpoint_format.DTYPES[dtype or arch["_dtype"]]
        config = configs.build_config(flavor, arch, fields)
        codec_description = codec_identity(codec, config)
    configs.check_parallel(config, tp, pp)

    hf = SafetensorsReader(hf_dir)
    model = structure_model(config)
    units = model_units(model)
    if encoder_reader is not None:
        probe = next(k for u in units.values() for k in u.slots if k.startswith("audio_encoder.model."))
        encoder_prefix = _encoder_prefix(encoder_reader, probe[len("audio_encoder.model."):], encoder_prefix)
    source = _Source(config, hf, seed, encoder_reader, encoder_prefix, parts)
    description = checkpoint_format.describe_model(
        config, flavor, tokenizer.identity() if tokenizer is not None else None,
        codec=codec_description,
        source=os.path.abspath(hf_dir),
        audio_encoder_source=os.path.abspath(audio_encoder) if audio_encoder else None,
        init=dict(seed=seed, rule="megatron_ualm.conversion.importer", noise_scale=NOISE_SCALE),
        target_parallel=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
    )
    common = {"checkpoint_version": 3.0, "iteration": 0, "ualm": description}
    with quiet_megatron_logs():
        writer = StreamingCheckpointWriter(output, common)
        try:
            for name, unit in tqdm(units.items(), desc="import", unit="unit", disable=not progress):
                writer.write(unit, source.unit(name, unit))
            ckpt = writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            hf.close()
    return ckpt
