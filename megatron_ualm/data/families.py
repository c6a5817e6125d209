"""The data families a shard can belong to, and their default up-sampling in a blend.

Kept apart from ``shards`` (which loads Megatron-Core) so command lines can validate a family
name before any heavy import.
"""

FAMILIES = ("understanding", "generation", "text", "chat", "preference")
"""understanding / generation / text: the pretraining mix; chat: SFT conversations (UALM-Reason
included); preference: DPO pairs."""

DEFAULT_UPSAMPLE = {"understanding": 1.0, "generation": 2.0, "text": 1.0, "chat": 1.0, "preference": 1.0}
"""Blend weight factor per family: generation is up-sampled 2x, as in the paper."""
