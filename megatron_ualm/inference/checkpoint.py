"""Loading model weights for generation from a Megatron distributed checkpoint."""

from __future__ import annotations

import os

from megatron.core import dist_checkpointing


def resolve_checkpoint(path: str) -> str:
    """The directory holding the distributed checkpoint.

    Accepts a ``torch_dist`` checkpoint directory itself, or a Megatron-LM ``--save`` root
    (``latest_checkpointed_iteration.txt`` names the ``iter_XXXXXXX`` folder).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is not a directory")
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        with open(tracker) as f:
            it = f.read().strip()
        sub = "release" if it == "release" else f"iter_{int(it):07d}"
        path = os.path.join(path, sub)
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise ValueError(f"{path} is not a Megatron distributed (torch_dist) checkpoint")
    return path


def load_checkpoint(model, path: str) -> None:
    """Loads weights into ``model`` (any TP; dist_checkpointing reshards).

    Tensors are matched by their global sharded keys, so a Megatron-LM ``--save`` checkpoint
    (model under ``model``) and a bare ``dist_checkpointing.save(model.sharded_state_dict())``
    both load.
    """
    path = resolve_checkpoint(path)
    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} model tensors, e.g. {missing[:3]}")
