"""UALM data: raw corpora -> token shards -> packed, blended training batches.

Pipeline::

    manifests (JSONL / Parquet)          tools/preprocess_{text,generation,understanding}.py
        -> records.py    per-family converters (tokenizer.py, audio.py, codec.py)
        -> preprocess.py parallel, resumable runner; errors.py per-record reasons
        -> shards.py     shard directories: aligned IndexedDataset streams + shard.json
    shards                              tools/build_blend.py, tools/inspect_shards.py
        -> blend.py      weights = tokens x family up-sampling; BlendedMegatronDatasetBuilder
        -> dataset.py    UALMDataset: packing, over-long rule, CFG condition dropout
        -> batch.py      collate_packed -> UALMBatch (block-diagonal mask, cu_seqlens)

``sequence.py`` owns the sequence format (roles, modality markers, delay pattern, targets).
"""
