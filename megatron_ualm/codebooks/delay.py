"""The MusicGen delay pattern for K parallel codebooks; pure torch, no model dependency.

Codebook k is shifted right by k steps, so T frames take ``T + K - 1`` steps and the model
predicts codebook k of frame t at step ``t + k``, after it has seen codebooks < k of the same
frame. Cells outside the shifted frames hold ``empty``. For K=3, T=4 (S = empty)::

    codes            delayed (apply_delay)
    [[1, 2, 3, 4],   [[1, 2, 3, 4, S, S],
     [5, 6, 7, 8],    [S, 5, 6, 7, 8, S],
     [9, 10, 11, 12]] [S, S, 9, 10, 11, 12]]

``revert_delay`` reads the diagonals back. A generator must run K-1 steps past the last frame.
"""

from __future__ import annotations

import torch


def delayed_length(num_frames: int, num_codebooks: int) -> int:
    """Steps needed for ``num_frames`` frames under the delay pattern: T + K - 1."""
    return num_frames + num_codebooks - 1 if num_frames > 0 else 0


def delay_valid_mask(num_codebooks: int, num_frames: int, device=None) -> torch.Tensor:
    """Which cells of the delayed layout hold a real code.

    Returns:
        bool ``[K, T + K - 1]``; cell (k, s) is valid when ``0 <= s - k < T``.
    """
    steps = torch.arange(delayed_length(num_frames, num_codebooks), device=device)
    frame = steps[None, :] - torch.arange(num_codebooks, device=device)[:, None]  # [K, S]
    return (frame >= 0) & (frame < num_frames)


def apply_delay(codes: torch.Tensor, empty: int) -> torch.Tensor:
    """Shifts codebook k right by k steps.

    Args:
        codes: ``[B, K, T]`` integer codes.
        empty: the id written into cells that hold no code.

    Returns:
        ``[B, K, T + K - 1]`` delayed codes.
    """
    B, K, T = codes.shape
    S = delayed_length(T, K)
    frame = torch.arange(S, device=codes.device)[None, :] - torch.arange(K, device=codes.device)[:, None]
    valid = (frame >= 0) & (frame < T)  # [K, S]
    gathered = codes.gather(2, frame.clamp(0, max(T - 1, 0)).expand(B, K, S))  # [B, K, S]
    return torch.where(valid, gathered, torch.full_like(gathered, empty))


def revert_delay(delayed: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
    """Inverse of ``apply_delay``: takes the diagonals back.

    Args:
        delayed: ``[B, K, S]`` with ``S >= T + K - 1``.
        num_frames: T; defaults to ``S - K + 1`` (all complete frames).

    Returns:
        ``[B, K, T]`` codes.
    """
    B, K, S = delayed.shape
    T = S - K + 1 if num_frames is None else num_frames
    if T < 0 or delayed_length(T, K) > S:
        raise ValueError(f"cannot revert {T} frames of {K} codebooks from {S} delayed steps")
    step = torch.arange(T, device=delayed.device)[None, :] + torch.arange(K, device=delayed.device)[:, None]
    return delayed.gather(2, step.expand(B, K, T))
