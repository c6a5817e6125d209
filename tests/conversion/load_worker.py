"""One rank of a checkpoint-load run (launched by test_conversion.py through torchrun).

Builds the UALM model described by the checkpoint's ``ualm`` description at the requested TP / PP,
resolves the ``--load`` directory with Megatron's own tracker functions, loads the model the
way ``megatron.training.checkpointing.load_checkpoint`` does for ``torch_dist`` (a ``model``
entry holding ``model.sharded_state_dict()``, then a strict ``load_state_dict``), runs a
forward-only pipeline step on text tokens and saves the gathered text logits from the last stage.
"""

import argparse
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.training.checkpointing import get_checkpoint_name, get_checkpoint_tracker_filename, read_metadata

from megatron_ualm import api
from megatron_ualm import checkpoint_format
from megatron_ualm.vocab import UALMVocab


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--load", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    args = p.parse_args()

    api.initialize_parallel(args.tp, args.pp, seed=1, timeout_minutes=2)
    iteration, release = read_metadata(get_checkpoint_tracker_filename(args.load))
    ckpt = get_checkpoint_name(args.load, iteration, release, return_base_dir=True)
    description = dist_checkpointing.load_common_state_dict(ckpt)["ualm"]
    config = checkpoint_format.config_from_description(
        description, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        use_cpu_initialization=True, pipeline_dtype=torch.float32,
    )
    model = api.build_model(config)
    request = {"model": model.sharded_state_dict(), "checkpoint_version": None, "iteration": None}
    state = dist_checkpointing.load(request, ckpt)
    model.load_state_dict(state["model"], strict=True)
    assert state["checkpoint_version"] == 3.0 and release and iteration == 0
    model.eval()

    tokens = torch.load(args.tokens)  # [b, s]
    b, s = tokens.shape
    vocab = UALMVocab.from_config(config)
    codes = torch.full((b, config.num_codebooks, s), vocab.code_empty, dtype=torch.long)
    captured = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(input_ids=batch[0], codes=batch[1], gather_output=True)

        def loss_func(out):
            captured.append(out[0].detach())  # [b, s, V]
            return out[0].sum() * 0.0, {}

        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([(tokens, codes)]), model=[model],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
        )
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(captured[0], args.out)
    api.destroy_parallel()


if __name__ == "__main__":
    main()
