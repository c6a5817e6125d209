"""Post-training of UALM on Megatron's loop, and the data it trains on.

- ``dpo_loss``: per-sequence log-probabilities from the vocab-parallel cross-entropies, the
  sigmoid DPO loss with an optional cross-entropy regulariser, Megatron forward steps;
- ``dpo_training``: the flags, checks, data, forward step and loop extensions of
  ``python -m megatron_ualm.dpo`` (SFT is ``python -m megatron_ualm.finetune``, LM training);
- ``reference``: reference log-probabilities, computed once in a forward-only pass and stored
  beside the run, or by a frozen reference model held beside the policy;
- ``jobs``: resumable generation jobs (journal, launch, task groups, decoding flags), which
- ``pairs`` (preference pairs from the model's own generations, ranked by scorers) and
- ``reflection`` (self-reflection records: audio 1, its caption, a critique, audio 2) run on;
- ``recipes``: the inputs of the CPU UALM-Gen / UALM-Reason recipes.
"""
