"""UALM on Megatron-LM's training loop: what ``pretrain``, ``finetune`` and ``dpo`` share.

- ``loop``: ``TrainingEntry`` (what an entry point brings) and ``run(entry)``; ``start``: how an
  entry point starts it (the warning summary before Megatron is imported);
- ``hooks``: the one layer that wraps Megatron functions, the ``RunContext`` of a run and the
  ``TrainingExtension`` interface extensions implement;
- ``providers``: the model provider, datasets provider and forward step of LM training;
- ``checks``: what is checked before anything is built; ``run_lock``: one run per ``--save``;
- ``arguments``: flavors as Megatron flags, UALM's flags; ``data``: loaders and synthetic rows;
- ``atomic_saves``: checkpoints that appear only when complete; ``metrics``: the ``[UALM]``
  line; ``freeze``: what trains in each stage; ``plot``: loss curves.

Extensions live with what they extend: the audio evaluation during training in
``evaluation.during_training``, DPO's in ``posttraining.dpo_training``.
"""
