"""Post-training of UALM on Megatron's loop: SFT on chat shards, DPO over every codebook.

- ``dpo``: per-sequence log-probabilities from the vocab-parallel cross-entropies, the sigmoid
  DPO loss with an optional cross-entropy regulariser, Megatron forward steps.
- ``reference``: reference log-probabilities, computed once in a forward-only pass and stored
  beside the run, or by a frozen reference model held beside the policy.
"""
