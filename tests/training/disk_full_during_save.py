"""Runs the pretraining entry point, but the disk is full when the iteration-6 checkpoint is written.

Every write of a checkpoint item into ``iter_0000006.partial`` fails with ENOSPC inside
Megatron's file-system writer, as it does on a full disk.
"""

import errno
import functools
import os
import sys

from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_ualm import pretrain

_write_item = filesystem_async._write_item


@functools.wraps(_write_item)  # Megatron inspects its signature
def _write_item_on_a_full_disk(*args, **kwargs):
    stream = next((a for a in args if hasattr(a, "name")), None)
    if stream is not None and "iter_0000006.partial" in str(stream.name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stream.name))
    return _write_item(*args, **kwargs)


filesystem_async._write_item = _write_item_on_a_full_disk

if __name__ == "__main__":
    pretrain.main(sys.argv[1:])
