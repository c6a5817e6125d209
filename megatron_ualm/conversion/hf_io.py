"""Reading and writing Hugging Face safetensors directories one tensor (or shard) at a time."""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_ualm.errors import CheckpointError


class ConversionError(CheckpointError):
    """A checkpoint cannot be converted; the message says which file or tensor and why."""


def read_json(path: str) -> dict:
    """Loads a JSON file, with a clear error when it is missing or malformed."""
    if not os.path.isfile(path):
        raise ConversionError(f"missing file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


class SafetensorsReader:
    """Lazy access to the tensors of a ``save_pretrained`` directory.

    Reads ``model.safetensors.index.json`` (sharded) or ``model.safetensors`` (single file).
    ``get`` reads one tensor from its shard through a memory map, so only the tensors being
    converted are ever in memory.

    Args:
        directory: the model directory.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no 'weight_map'")
            self.weight_map: Dict[str, str] = weight_map
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConversionError(
                f"no safetensors weights in {directory}: expected model.safetensors or "
                "model.safetensors.index.json (save the model with save_pretrained(safe_serialization=True))"
            )
        for shard in sorted(set(self.weight_map.values())):
            if not os.path.isfile(os.path.join(directory, shard)):
                raise ConversionError(f"missing file {os.path.join(directory, shard)} (listed in the index)")
        self._open: Dict[str, object] = {}

    @classmethod
    def from_file(cls, path: str) -> "SafetensorsReader":
        """A reader over one ``.safetensors`` file with any name."""
        if not os.path.isfile(path):
            raise ConversionError(f"missing file {path}")
        reader = cls.__new__(cls)
        reader.directory = os.path.dirname(path)
        with safe_open(path, framework="pt") as f:
            reader.weight_map = {k: os.path.basename(path) for k in f.keys()}
        reader._open = {}
        return reader

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One tensor, checked against ``shape`` when given.

        Raises:
            ConversionError: the tensor is absent or its shape differs from ``shape``.
        """
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name!r} not found in {self.directory}")
        shard = self.weight_map[name]
        if shard not in self._open:
            self._open[shard] = safe_open(os.path.join(self.directory, shard), framework="pt")
        tensor = self._open[shard].get_tensor(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ConversionError(
                f"tensor {name!r} in {os.path.join(self.directory, shard)} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(shape)}"
            )
        return tensor

    def close(self) -> None:
        self._open.clear()


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"100KB"`` / ``"123"`` -> bytes."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards plus an index.

    Tensors are buffered until ``max_shard_bytes`` is reached, then the shard is written and
    dropped, so at most one shard (plus the tensor being added) is in memory. ``close`` renames
    the shards to their final ``-of-N`` names and writes ``model.safetensors.index.json`` (or a
    single ``model.safetensors`` when everything fit in one shard).

    Args:
        directory: output directory (created).
        max_shard_bytes: shard size limit.
        metadata: safetensors header metadata (``{"format": "pt"}`` by default).
    """

    def __init__(self, directory: str, max_shard_bytes: int, metadata: Optional[Dict[str, str]] = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        os.makedirs(directory, exist_ok=True)
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def add_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in tensors:
            self.add(name, tensor)

    def _tmp_name(self, i: int) -> str:
        return os.path.join(self.directory, f".shard-{i:05d}.safetensors")

    def _flush(self) -> None:
        if not self._buffer:
            return
        save_file(self._buffer, self._tmp_name(len(self._shards)), metadata=self.metadata)
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> List[str]:
        """Finishes the directory; returns the shard file names."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (keys, name) in enumerate(zip(self._shards, names)):
            os.replace(self._tmp_name(i), os.path.join(self.directory, name))
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return names
