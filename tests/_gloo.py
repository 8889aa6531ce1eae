"""What the tests' gloo worker processes (torch.multiprocessing.spawn) share."""

import contextlib
import os
import sys
import traceback

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, store_path: str, world: int):
    """A gloo process group of ``world`` ranks through the file store at ``store_path``,
    left together: the block's error is printed (spawn shows only its type), and no rank
    tears the group down while another still talks (gloo aborts)."""
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def leave() -> None:
    """Every check passed: leave without the interpreter's teardown, where a C++ thread's
    destructor sometimes aborts the process after the group is gone ("terminate called
    without an active exception", about 1 run in 10 on a 2-core CPU)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
