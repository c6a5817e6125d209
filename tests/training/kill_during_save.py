"""Runs the pretraining entry point, but the save at iteration 6 hangs half-written.

The test SIGKILLs this process once the marker file appears: the state it leaves is a run
killed in the middle of writing a checkpoint.
"""

import os
import sys
import time

from megatron.core import dist_checkpointing

from megatron_ualm import pretrain

_save = dist_checkpointing.save


def _save_then_hang(sharded_state_dict, checkpoint_dir, *args, **kwargs):
    if str(checkpoint_dir).rstrip("/").endswith("iter_0000006.partial"):
        os.makedirs(checkpoint_dir, exist_ok=True)
        with open(os.path.join(checkpoint_dir, "half_written.distcp"), "w") as f:
            f.write("partial")
        marker = os.environ["UALM_TEST_MARKER"]
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))  # torchrun starts workers in their own session: the test kills this pid too
        os.replace(marker + ".tmp", marker)
        time.sleep(600)
    return _save(sharded_state_dict, checkpoint_dir, *args, **kwargs)


dist_checkpointing.save = _save_then_hang

if __name__ == "__main__":
    pretrain.main(sys.argv[1:])
