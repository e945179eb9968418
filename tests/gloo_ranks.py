"""Test code on gloo ranks: ``spawn_ranks(fn, *args)`` runs ``fn(rank, *args)`` in ``world``
spawned processes that share a gloo process group (``torch.multiprocessing.spawn``)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, *args)`` (a module-level function) on ``world`` gloo ranks; raises what a
    rank raised."""
    mp.spawn(_rank, args=(fn, free_port(), world, args), nprocs=world, join=True)


def _rank(rank: int, fn: Callable[..., None], port: int, world: int, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Both ranks are done and the group is destroyed, yet about one run in twenty the
    # interpreter's own teardown then aborts ("terminate called without an active
    # exception": a C++ thread still joinable at exit) and spawn reports SIGABRT, with every
    # check passed. Leave without that teardown; an exception above still goes the normal way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
