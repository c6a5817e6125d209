"""UALM Megatron checkpoint -> Hugging Face directory, one unit at a time.

Layout of the exported directory::

    config.json, model*.safetensors[, model.safetensors.index.json]
        the text part as a ``Qwen2ForCausalLM``: all ``vocab_size`` rows of the embedding and
        the text head (text ids, then the 32 UALM special tokens, then padding), decoder, norm.
    ualm_audio.safetensors
        codebook_embeddings.weight          [K * card, h]  row k * card + c = code c of codebook k
        codebook_heads.weight               [K, card, h]   logits of codebook k = hidden @ W[k].T
        audio_adapter.projector.encoder.linear_fc1.weight / .bias   [f, d * stack], [f]
        audio_adapter.projector.encoder.linear_fc2.weight / .bias   [h, f], [h]
            (Megatron ``AudioProjection``: stack ``stack`` encoder frames, fc1, GELU, fc2)
    audio_encoder/config.json, audio_encoder/model*.safetensors
        the frozen encoder as a standalone ``transformers`` model (``Qwen2AudioEncoder``,
        ``AudioFlamingo3Encoder`` or ``WhisperEncoder``); ``from_pretrained`` loads it and it
        can serve as ``UALMConfig.audio_encoder_path``.
    ualm_config.json
        ``description``: flavor, every architecture field, codec identity, dtype; ``special_tokens``:
        the special-token ids; ``layout``: the version of this file's layout. Its presence makes the importer
        restore every tensor exactly.
    tokenizer files, copied from ``--tokenizer`` when given.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_ualm import checkpoint_format
from megatron_ualm.conversion import configs, layout
from megatron_ualm.conversion.hf_io import ConversionError, ShardedSafetensorsWriter, parse_size
from megatron_ualm.conversion.importer import ENCODER_SUBDIR, UALM_AUDIO_FILE, UALM_CONFIG_FILE
from megatron_ualm.conversion.megatron_io import (
    load_unit,
    model_units,
    quiet_megatron_logs,
    structure_model,
)
from megatron_ualm.files import partial_dir
from megatron_ualm.vocab import SPECIAL_TOKENS, UALMVocab

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "generation_config.json", "chat_template.jinja",
)

LAYOUT = {
    "codebook_embeddings.weight": "[K * card, h]; row k * card + c is code c of codebook k",
    "codebook_heads.weight": "[K, card, h]; logits of codebook k = hidden @ W[k].T",
    "audio_adapter.*": "Megatron AudioProjection MLP: stack encoder frames, linear_fc1, GELU, linear_fc2",
    "audio_encoder/": "standalone transformers encoder directory (from_pretrained)",
    "model*.safetensors": "Qwen2ForCausalLM, all vocab_size rows (text, 32 specials, padding)",
}


def _hf_names(unit_name: str, tensors: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Text-part tensors of one unit under their ``Qwen2ForCausalLM`` names."""
    if unit_name.startswith("decoder.layers."):
        i = int(unit_name.split(".")[2])
        prefix = f"{unit_name}."
        meg = {k[len(prefix):]: v for k, v in tensors.items()}
        hf = layout.megatron_layer_to_hf(meg, config.num_attention_heads, config.num_query_groups)
        return {f"model.layers.{i}.{k}": v for k, v in hf.items()}
    names = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "output_layer.weight": "lm_head.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
    }
    return {names[k]: v for k, v in tensors.items() if k in names}


def tokenizer_files(tokenizer: str) -> list[str]:
    """The tokenizer files an export copies: those of ``TOKENIZER_FILES`` in a folder, or a given
    file (``tokenizer.json``, a sentencepiece ``.model``) and its folder's other tokenizer files.

    Raises:
        ConversionError: the path is missing or holds no tokenizer file.
    """
    if not os.path.exists(tokenizer):
        raise ConversionError(f"--tokenizer {tokenizer} does not exist; give the tokenizer's folder (e.g. the base "
                              "model's Hugging Face folder) or its tokenizer.json")
    folder, given = (tokenizer, None) if os.path.isdir(tokenizer) else (os.path.dirname(tokenizer) or ".", tokenizer)
    files = [os.path.join(folder, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    if given is not None and os.path.abspath(given) not in map(os.path.abspath, files):
        files.insert(0, given)
    if not files:
        raise ConversionError(f"{tokenizer} holds none of the tokenizer files {list(TOKENIZER_FILES)}")
    return files


def _check_tokenizer(description: Dict[str, Any], files: list[str], ckpt: str) -> None:
    """The tokenizer copied into the export must be the one the checkpoint was trained with."""
    from megatron_ualm.data.tokenizer import TextTokenizer

    for path in files:
        if path.endswith(("tokenizer.json", ".model")):
            checkpoint_format.check_tokenizer(description, TextTokenizer(path).identity(), ckpt, path)
            return


def export_hf(
    load: str,
    output: str,
    *,
    tokenizer: Optional[str] = None,
    dtype: Optional[str] = None,
    flavor: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    max_shard_size: str = "5GB",
    progress: bool = True,
) -> str:
    """Writes the HF directory of a UALM checkpoint (layout in the module docstring).

    Args:
        load: a ``--load`` / ``--save`` directory (tracker file) or one iteration directory.
        output: directory to create.
        tokenizer: directory whose tokenizer files are copied alongside.
        dtype: output dtype (default: the checkpoint's).
        flavor: optional; checked against the checkpoint's description. Needed only for checkpoints
            that do not describe their model (bare ``dist_checkpointing`` saves).
        overrides: ``UALMConfig`` fields of such a run that differ from the flavor.
        max_shard_size: safetensors shard size (e.g. ``5GB``); memory stays near one shard.
        progress: show a progress bar.

    Returns:
        ``output``.
    """
    ckpt = checkpoint_format.resolve_checkpoint(load)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConversionError(f"output {output} exists and is not an empty directory; choose a new one")
    description = checkpoint_format.read_description(ckpt)
    if description is not None:
        checkpoint_format.check_flavor(description, flavor, ckpt)
        config = checkpoint_format.config_from_description(description, **(overrides or {}))
    elif flavor is not None:
        config = checkpoint_format.config_from_checkpoint(ckpt, flavor, **(overrides or {}))
        description = checkpoint_format.describe_model(config, flavor, codec=None, source=os.path.abspath(ckpt))
    else:
        raise ConversionError(
            f"{ckpt} does not describe its model (no 'ualm' description, no training args): pass --flavor "
            "(and --override for fields the training run changed)"
        )
    copied = tokenizer_files(tokenizer) if tokenizer is not None else []
    _check_tokenizer(description, copied, ckpt)
    out_dtype = checkpoint_format.DTYPES[dtype] if dtype else config.params_dtype
    final, output = output, partial_dir(output)  # written whole under a hidden name, then renamed
    shutil.rmtree(output, ignore_errors=True)  # an earlier export that was killed
    os.makedirs(output)
    try:
        _write(ckpt, config, description, out_dtype, copied, output, max_shard_size, progress)
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)
        raise
    os.replace(output, final)  # an empty final directory is replaced too
    return final


def _write(ckpt: str, config, description: dict, out_dtype, tokenizer: list[str], output: str, max_shard_size: str,
           progress: bool) -> None:
    """The export's files, into ``output``."""
    model = structure_model(config)
    units = model_units(model)
    text = ShardedSafetensorsWriter(output, parse_size(max_shard_size))
    encoder = None
    if config.audio_encoder_type is not None:
        encoder = ShardedSafetensorsWriter(os.path.join(output, ENCODER_SUBDIR), parse_size(max_shard_size))
    audio: Dict[str, torch.Tensor] = {}
    with quiet_megatron_logs():
        for name, unit in tqdm(units.items(), desc="export", unit="unit", disable=not progress):
            tensors = load_unit(ckpt, unit.slots, dtype=out_dtype)
            if name.startswith("audio_encoder"):
                encoder.add_all((k[len("audio_encoder.model."):], v) for k, v in tensors.items())
            elif name in ("embedding.codebook_embeddings", "codebook_heads", "audio_adapter"):
                audio.update({k.removeprefix("embedding."): v.contiguous() for k, v in tensors.items()})
            else:
                text.add_all(_hf_names(name, tensors, config).items())
    text.close()
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(configs.qwen2_config_dict(config, out_dtype), f, indent=2)
    save_file(audio, os.path.join(output, UALM_AUDIO_FILE), metadata={"format": "pt"})
    if encoder is not None:
        encoder.close()
        enc_cfg = configs.encoder_config_dict(config)
        enc_cfg["dtype"] = checkpoint_format.dtype_name(out_dtype)
        with open(os.path.join(output, ENCODER_SUBDIR, "config.json"), "w") as f:
            json.dump(enc_cfg, f, indent=2)
    description = dict(description, params_dtype=checkpoint_format.dtype_name(out_dtype))
    vocab = UALMVocab.from_config(config)
    with open(os.path.join(output, UALM_CONFIG_FILE), "w") as f:
        json.dump(dict(description=description, special_tokens={t: vocab.special(t) for t in SPECIAL_TOKENS}, layout=LAYOUT),
                  f, indent=2)
    for path in tokenizer:
        shutil.copy2(path, os.path.join(output, os.path.basename(path)))
