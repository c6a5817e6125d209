"""Per-iteration UALM metrics on top of Megatron's log line.

Megatron's ``training_log`` already prints the loss dict (``lm loss``, ``text loss``,
``codebook_{k} loss``), learning rate and grad norm, and its TFLOP/s uses the backbone-only
formula. This module counts what the backbone formula cannot see (audio-in windows through
the frozen encoder and the adapter, RVQ heads, rows per data family) and adds a line with
tokens/s/GPU and UALM TFLOP/s/GPU, also to TensorBoard.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field

import torch

from megatron_ualm.config import UALMConfig
from megatron_ualm.data.families import FAMILIES
from megatron_ualm.flops import step_flops
from megatron_ualm.models.encoder import encoder_hf_config, window_geometry


@dataclass
class StepCounters:
    """What the forward steps saw since the last log line."""

    sequences: int = 0
    encoder_windows: int = 0
    families: collections.Counter = field(default_factory=collections.Counter)
    total_families: collections.Counter = field(default_factory=collections.Counter)

    def record(self, batch) -> None:
        """Counts one micro-batch (called by the forward step, before the device copy)."""
        self.sequences += batch.tokens.shape[0]
        if batch.audio_in_lengths is not None:
            self.encoder_windows += int(batch.audio_in_lengths.numel())
        counts = getattr(batch, "family_counts", None)
        if counts:
            self.families.update(counts)
            self.total_families.update(counts)

    def reset(self) -> None:
        self.sequences, self.encoder_windows = 0, 0
        self.families = collections.Counter()


class UALMThroughput:
    """Turns counters and wall time into tokens/s/GPU and model TFLOP/s/GPU.

    Args:
        config: model config.
        seq_length: s.
        world_size: GPUs (ranks) in the job.
        data_parallel_size: DP size (each DP rank reads its own micro-batches).
    """

    def __init__(self, config: UALMConfig, seq_length: int, world_size: int, data_parallel_size: int):
        self.config, self.seq_length = config, seq_length
        self.world_size, self.dp = world_size, data_parallel_size
        # Geometry from the config alone: the rank that logs (last stage) has no encoder.
        self.encoder_config = encoder_hf_config(config) if config.audio_encoder_type else None
        self.frames_per_window = window_geometry(config)[2] if config.audio_encoder_type else 0
        self.counters = StepCounters()

    def _global_counts(self, families: list[str]) -> list[int]:
        """[sequences, encoder windows, samples per family] summed over the data-parallel group.

        Each DP rank reads its own micro-batches, so only the sum is the job's batch (one rank's
        count times DP is not: families and audio differ between ranks). Every rank of the
        group must call this at the same iteration (the log interval).
        """
        c = self.counters
        other = sum(n for f, n in c.families.items() if f not in families)
        counts = [c.sequences, c.encoder_windows] + [c.families.get(f, 0) for f in families] + [other]
        if self.dp > 1 and torch.distributed.is_initialized():
            from megatron.core import parallel_state

            device = "cuda" if torch.cuda.is_available() else "cpu"
            t = torch.tensor(counts, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
            counts = [int(round(v)) for v in t.tolist()]
        return counts

    def report(self, seconds: float) -> dict:
        """Metrics since the previous call (a collective over the data-parallel group); resets the counters.

        Args:
            seconds: the training time the counted steps took (the loop gives Megatron's interval
                timer, which leaves out checkpoint saves and evaluations, as its own line does).
        """
        c = self.counters
        # A fixed list: every rank of the group must reduce a tensor of the same length.
        families = list(FAMILIES)
        sequences, windows, *per_family = self._global_counts(families)
        families.append("other")
        flops = step_flops(self.config, sequences, self.seq_length, adapter_frames=windows * self.frames_per_window,
                           encoder_windows=windows, encoder_hf_config=self.encoder_config)
        out = {
            "tokens_per_sec_per_gpu": sequences * self.seq_length / max(seconds, 1e-9) / self.world_size,
            "ualm_tflops_per_gpu": flops.total / max(seconds, 1e-9) / 1e12 / self.world_size,
            "encoder_windows": windows,
            **{f"samples_{fam}": n for fam, n in zip(families, per_family) if n},
        }
        c.reset()
        return out


def format_metrics(metrics: dict) -> str:
    """The ``[UALM]`` line's text: tokens/s as a whole number at any size (``10320``, not
    ``1.032e+04``), the other rates to 4 significant digits, counts as they are."""

    def value(key, v):
        if key.startswith("tokens_per_"):
            return f"{v:.0f}"
        return f"{v:.4g}" if "_per_" in key else str(v)

    return " | ".join(f"{k}: {value(k, v)}" for k, v in metrics.items())


def append_metrics(save_dir: str, row: dict) -> None:
    """Appends one row to ``<save>/metrics.jsonl`` (the last rank writes; one run per directory).

    Rows of one iteration may come in several lines (training, in-training evaluation);
    ``training.plot.read_metrics`` merges them.
    """
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
