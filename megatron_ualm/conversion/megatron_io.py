"""Streaming reads and writes of UALM Megatron distributed (``torch_dist``) checkpoints.

A ``torch_dist`` checkpoint stores every tensor in its *global* layout with the chunk
offsets of the ranks that wrote it; Megatron reshards on load, so a checkpoint written from
a TP=1 / PP=1 view loads at any TP / PP. Conversion therefore works on the TP=1 / PP=1 view
of the model, built on the meta device (no memory), and moves one *unit* at a time (the
embeddings, one decoder layer, one encoder layer, the heads):

* write: each unit is saved with ``megatron.core.dist_checkpointing.save`` into a scratch
  directory; its data files are moved into the checkpoint and the units' PyTorch-DCP
  ``.metadata`` records are merged into one (chunks of the per-layer stacked tensors
  ``decoder.layers.*`` come from different units). Peak memory is one unit.
* read: each unit's tensors are loaded with ``dist_checkpointing.load`` into freshly
  allocated tensors of that unit only.

Keys, shapes, the stacked-layer layout, the swiglu factory and the codebook heads' logical
``[K, card, h]`` layout all come from ``UALMModel.sharded_state_dict()``, so the files are
exactly what a training run of the same model would write.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pickle
import re
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.overrides import TorchFunctionMode

from megatron_ualm.compat import cpu as cpu_compat
from megatron_ualm.config import UALMConfig
from megatron_ualm.conversion.hf_io import ConversionError
from megatron_ualm.checkpoint_format import RELEASE, TRACKER
from megatron_ualm.files import atomic_write, partial_dir
from megatron_ualm.launch import free_port

_COMMON_KEY = "common_state"


def ensure_world_of_one() -> None:
    """A gloo process group of one and Megatron's TP = PP = 1 groups, unless already set up.

    Conversion runs in a single process on the host (no GPU needed); an existing parallel
    state is reused only when it is TP = PP = 1.
    """
    cpu_compat.apply()
    if not torch.distributed.is_initialized():
        # A tcp init_method rather than MASTER_* variables: the environment is left alone, so
        # subprocesses do not inherit a port this process holds.
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
            timeout=datetime.timedelta(minutes=30),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    sizes = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if sizes != (1, 1):
        raise ConversionError(
            f"checkpoint conversion runs in a TP=1, PP=1 process, but this process has TP, PP = {sizes}; "
            "run the converter on its own (it writes a checkpoint that loads at any TP/PP)"
        )


_META_FACTORIES = {"empty", "zeros", "ones", "full", "rand", "randn", "empty_strided", "normal"}


class _MetaDevice(TorchFunctionMode):
    """Puts every new parameter-sized tensor on the meta device, even with an explicit device.

    ``torch.device("meta")`` is not enough: Megatron passes ``device=`` explicitly in places
    and the CPU shims wrap the factories, which hides them from the device context.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", None) in _META_FACTORIES and "Tensor" not in getattr(func, "__qualname__", ""):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def structure_model(config: UALMConfig):
    """The TP=1 / PP=1 ``UALMModel`` of ``config`` with all parameters on the meta device."""
    from megatron_ualm.models.ualm_model import UALMModel

    ensure_world_of_one()
    config = dataclasses.replace(
        config,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=False,
        transformer_impl="local",
        audio_encoder_path=None,
    )
    with _MetaDevice():
        return UALMModel(config)


def unit_of(key: str) -> str:
    """The conversion unit a state-dict key belongs to."""
    m = re.match(r"(decoder\.layers\.\d+|audio_encoder\.model\.layers\.\d+)\.", key)
    if m:
        return m.group(1)
    for prefix in ("embedding.word_embeddings", "embedding.codebook_embeddings", "output_layer", "codebook_heads"):
        if key.startswith(prefix + "."):
            return prefix
    return key.split(".")[0]  # decoder (final norm), audio_encoder (stem), audio_adapter


@dataclasses.dataclass(frozen=True)
class Slot:
    """The region of one checkpoint tensor that one state-dict entry of the TP=1 model owns.

    Attributes:
        key: checkpoint key (e.g. ``decoder.layers.mlp.linear_fc1.weight``, stacked over layers).
        offset: global offset of the region (the layer index on a stacked axis, else 0).
        region: shape of the region, with a leading 1 per stacked axis.
        global_shape: shape of the whole checkpoint tensor.
        shape: shape of the entry as conversion code sees it (``region`` without stacked axes;
            the codebook heads' logical ``[K, card, h]``).
        dtype: the model's dtype for it.
    """

    key: str
    offset: Tuple[int, ...]
    region: Tuple[int, ...]
    global_shape: Tuple[int, ...]
    shape: Tuple[int, ...]
    dtype: torch.dtype


def _slot(item) -> Slot:
    if isinstance(item, ShardedTensorFactory):
        built = item.build()
        built = [built] if isinstance(built, ShardedTensor) else nested_values(built)
        pieces = [p for p in built if isinstance(p, ShardedTensor)]
    else:
        pieces = [item]
    keys = {p.key for p in pieces}
    if len(keys) != 1:
        raise ConversionError(f"sharded item builds several checkpoint keys {sorted(keys)}")
    lo = [min(p.global_offset[a] for p in pieces) for a in range(len(pieces[0].global_shape))]
    hi = [
        max(p.global_offset[a] + ((1,) * p.prepend_axis_num + tuple(p.local_shape))[a] for p in pieces)
        for a in range(len(lo))
    ]
    region = tuple(h - l for h, l in zip(hi, lo))
    return Slot(
        key=pieces[0].key, offset=tuple(lo), region=region, global_shape=tuple(pieces[0].global_shape),
        shape=tuple(item.data.shape), dtype=item.data.dtype,
    )


@dataclasses.dataclass
class Unit:
    """What one conversion step moves: tensor slots and the (empty) ``_extra_state`` objects.

    Attributes:
        slots: state-dict name -> slot.
        objects: state-dict name -> Megatron ``ShardedObject`` (written as they are).
    """

    slots: Dict[str, Slot] = dataclasses.field(default_factory=dict)
    objects: Dict[str, ShardedObject] = dataclasses.field(default_factory=dict)


def model_units(model) -> "OrderedDict[str, Unit]":
    """The TP=1 model's sharded state dict as conversion units, in model order.

    Keys of ``Unit.slots`` are the model's state-dict names (``decoder.layers.3.mlp.linear_fc1.weight``).
    """
    units: "OrderedDict[str, Unit]" = OrderedDict()
    for key, item in model.sharded_state_dict().items():
        unit = units.setdefault(unit_of(key), Unit())
        if isinstance(item, ShardedObject):
            unit.objects[key] = item
        else:
            unit.slots[key] = _slot(item)
    return units


def _merge_metadata(target, part, rename: Dict[str, str], slots: Dict[str, Slot]) -> None:
    """Adds a unit's DCP metadata to ``target``.

    The unit saved each region as a standalone tensor; here its chunk moves to the region's
    global offset and takes the global shape, and its data file gets its new name. Each unit
    save also stores an (empty) ``common_state`` object; the checkpoint keeps the common save's.
    """
    for fqn, md in part.state_dict_metadata.items():
        if fqn.startswith(_COMMON_KEY):
            continue
        if not isinstance(md, TensorStorageMetadata):  # a ShardedObject, stored whole
            if fqn in target.state_dict_metadata:
                raise ConversionError(f"{fqn} was written by two units")
            target.state_dict_metadata[fqn] = md
            continue
        slot = slots[fqn]
        chunks = [
            dataclasses.replace(c, offsets=torch.Size(o + s for o, s in zip(c.offsets, slot.offset)))
            for c in md.chunks
        ]
        if fqn in target.state_dict_metadata:
            have = target.state_dict_metadata[fqn]
            if tuple(have.size) != slot.global_shape:
                raise ConversionError(f"{fqn}: units disagree on the global shape ({tuple(have.size)} vs {slot.global_shape})")
            have.chunks.extend(chunks)
        else:
            target.state_dict_metadata[fqn] = dataclasses.replace(md, size=torch.Size(slot.global_shape), chunks=chunks)
    for index, info in part.storage_data.items():
        if index.fqn.startswith(_COMMON_KEY):
            continue
        offset = index.offset
        if index.fqn in slots:
            offset = torch.Size(o + s for o, s in zip(index.offset, slots[index.fqn].offset))
        target.storage_data[MetadataIndex(index.fqn, offset)] = dataclasses.replace(
            info, relative_path=rename[info.relative_path]
        )


def _check_complete(metadata) -> None:
    """Every tensor's chunks cover its global shape (no hole left by a missing unit)."""
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        covered = sum(math.prod(c.sizes) for c in md.chunks)
        if covered != math.prod(md.size):
            raise ConversionError(f"{fqn}: chunks cover {covered} of {math.prod(md.size)} elements of shape {tuple(md.size)}")


class StreamingCheckpointWriter:
    """Writes a Megatron ``torch_dist`` checkpoint unit by unit.

    Usage::

        writer = StreamingCheckpointWriter(out_dir, common_state)
        for name, unit in model_units(model).items():
            writer.write(unit, tensors)    # tensors: state-dict name -> tensor of slot.shape
        writer.close()                     # merged metadata + tracker

    The result is ``out_dir/release/`` plus ``out_dir/latest_checkpointed_iteration.txt``
    containing ``release``: Megatron's loader takes it with ``--load`` (iteration 0, no
    optimizer or RNG state) or ``--pretrained-checkpoint``.

    Everything is written under ``.<out_dir name>.partial`` beside ``out_dir`` and renamed to
    ``out_dir`` by ``close``: a failed or killed conversion leaves nothing that looks like a
    checkpoint, and a rerun into the same ``out_dir`` starts clean (``abort`` removes the
    partial directory; a leftover of a killed run is removed by the next writer).

    Args:
        out_dir: the ``--load`` directory to create (must be empty or absent).
        common_state: non-tensor entries (``checkpoint_version``, ``iteration``, metadata).
    """

    def __init__(self, out_dir: str, common_state: dict):
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise ConversionError(f"output directory {out_dir} is not empty; choose a new one")
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ConversionError(f"output {out_dir} is a file; choose a new directory")
        self.final_dir = os.path.abspath(out_dir)
        self.out_dir = partial_dir(self.final_dir)
        shutil.rmtree(self.out_dir, ignore_errors=True)
        self.ckpt_dir = os.path.join(self.out_dir, RELEASE)
        self.scratch = os.path.join(self.out_dir, ".units")
        os.makedirs(self.ckpt_dir)
        ensure_world_of_one()
        # common_state (and metadata.json) come from a regular save of no tensors.
        dist_checkpointing.save(dict(common_state), self.ckpt_dir)
        self.metadata = FileSystemReader(self.ckpt_dir).read_metadata()
        self.units = 0

    def write(self, unit: Unit, tensors: Dict[str, torch.Tensor]) -> None:
        """Saves one unit (every slot needs its tensor) and folds it into the checkpoint."""
        slots = unit.slots
        missing = sorted(set(slots) - set(tensors))
        if missing:
            raise ConversionError(f"no tensor given for {missing}")
        sharded, by_key = {}, {}
        for name, slot in slots.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != slot.shape:
                raise ConversionError(f"{name}: got a tensor of shape {tuple(tensor.shape)}, expected {slot.shape}")
            data = tensor.to(slot.dtype).reshape(slot.region).contiguous()
            sharded[name] = ShardedTensor.from_rank_offsets(slot.key, data, replica_id=0)
            by_key[slot.key] = slot
        sharded.update(unit.objects)
        part_dir = os.path.join(self.scratch, f"{self.units:05d}")
        os.makedirs(part_dir)
        dist_checkpointing.save(sharded, part_dir, validate_access_integrity=False)
        part = FileSystemReader(part_dir).read_metadata()
        rename = {}
        for info in part.storage_data.values():
            if info.relative_path not in rename:
                new = f"u{self.units:05d}{info.relative_path}"
                os.replace(os.path.join(part_dir, info.relative_path), os.path.join(self.ckpt_dir, new))
                rename[info.relative_path] = new
        _merge_metadata(self.metadata, part, rename, by_key)
        shutil.rmtree(part_dir)
        self.units += 1

    def close(self) -> str:
        """Writes the merged metadata and the tracker, then moves the checkpoint into place.

        Returns:
            The checkpoint directory (``out_dir/release``).
        """
        _check_complete(self.metadata)
        atomic_write(os.path.join(self.ckpt_dir, ".metadata"), pickle.dumps(self.metadata))
        shutil.rmtree(self.scratch, ignore_errors=True)
        with open(os.path.join(self.out_dir, TRACKER), "w") as f:
            f.write(RELEASE)
        os.replace(self.out_dir, self.final_dir)  # an empty final directory is replaced too
        return os.path.join(self.final_dir, RELEASE)

    def abort(self) -> None:
        """Removes everything written so far."""
        shutil.rmtree(self.out_dir, ignore_errors=True)


def load_common(ckpt_dir: str) -> dict:
    """The non-tensor part of a checkpoint."""
    return dist_checkpointing.load_common_state_dict(ckpt_dir)


def stored_shapes(ckpt_dir: str) -> Dict[str, Tuple[int, ...]]:
    """Global shape of every tensor in a checkpoint, by checkpoint key."""
    md = FileSystemReader(ckpt_dir).read_metadata()
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads one region of a checkpoint tensor per state-dict entry (any stored chunking)."""

    def __init__(self, offsets: Dict[str, Tuple[int, ...]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for fqn, tensor in self.state_dict.items():
            md = self.metadata.state_dict_metadata[fqn]
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[fqn]), sizes=tensor.size())
            requests += create_read_items_for_chunk_list(fqn, md, [chunk])
        return LoadPlan(requests)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        # dest_offsets are relative to the requested region, which is the whole local tensor.
        tensor = self.state_dict[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor


def load_unit(ckpt_dir: str, slots: Dict[str, Slot], dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Reads one unit's tensors from a checkpoint written at any TP / PP.

    Args:
        ckpt_dir: the directory with ``metadata.json``.
        slots: the unit's slots (``Unit.slots`` from ``model_units``).
        dtype: dtype to read into (default: each slot's dtype).

    Returns:
        State-dict name -> tensor of ``slot.shape``.

    Raises:
        ConversionError: a tensor is missing from the checkpoint or has another global shape.
    """
    shapes = stored_shapes(ckpt_dir)
    request, offsets = {}, {}
    for name, slot in slots.items():
        if slot.key not in shapes:
            raise ConversionError(f"{ckpt_dir} has no tensor {slot.key!r} (for {name})")
        if shapes[slot.key] != slot.global_shape:
            raise ConversionError(
                f"{ckpt_dir}: tensor {slot.key!r} has shape {shapes[slot.key]}, the model expects {slot.global_shape}"
            )
        if slot.key in request:
            raise ConversionError(f"two entries of one unit read {slot.key!r}")
        request[slot.key] = torch.empty(slot.region, dtype=dtype or slot.dtype)
        offsets[slot.key] = slot.offset
    dcp.load(request, storage_reader=FileSystemReader(ckpt_dir), planner=_RegionLoadPlanner(offsets), no_dist=True)
    return {name: request[slot.key].reshape(slot.shape) for name, slot in slots.items()}


@contextmanager
def quiet_megatron_logs():
    """Silences Megatron's per-save info logs during many small unit saves."""
    import logging

    logger = logging.getLogger("megatron.core")
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)



