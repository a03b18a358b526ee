"""Rank processes of an in-test process group (torch.multiprocessing.spawn) on a free loopback port."""

from __future__ import annotations

import torch.multiprocessing as mp

from omni_model.runtime.parallel import _free_port


def spawn_on_free_port(worker, args: tuple, nprocs: int = 2, attempts: int = 3) -> None:
    """`worker(rank, port, *args)` in `nprocs` processes. The port is free when picked, not reserved: the other
    make test worker can take it first (EADDRINUSE seen in test_chunked_loss), so a taken port is retried with a new
    one, as runtime.parallel._init_private_group does for the one-rank group."""
    for attempt in range(attempts):
        try:
            mp.spawn(worker, args=(_free_port(), *args), nprocs=nprocs)
            return
        except mp.ProcessRaisedException as error:
            if "EADDRINUSE" not in str(error) or attempt == attempts - 1:
                raise
