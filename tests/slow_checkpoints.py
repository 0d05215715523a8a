"""`python tests/slow_checkpoints.py SECONDS VERB ARGS...`: the lmtune CLI with a pause of SECONDS after
every checkpoint's shards are written (before meta.pt and the manifest), so that a test can kill a run
while a checkpoint is half written. The pause is patched in here: lmtune itself has no test hooks."""

import sys
import time

import torch.distributed.checkpoint as dcp

from lmtune.cli import main


def slowed(save, seconds: float):
    def save_then_wait(*args, **kwargs):
        result = save(*args, **kwargs)
        time.sleep(seconds)
        return result
    return save_then_wait


if __name__ == "__main__":
    dcp.save = slowed(dcp.save, float(sys.argv[1]))
    main(sys.argv[2:])
