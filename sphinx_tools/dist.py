"""Every distributed concern in one place: process groups, fairscale model-parallel groups,
seeding and rank-0 printing. Other code gets a ready model and never checks ranks."""

from __future__ import annotations

import contextlib
import io
import os
import socket

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def maybe_init_dist(backend: str | None = None) -> int:
    """Join the torchrun world if launched by torchrun, else start a 1-process gloo world.

    Returns:
        This process's global rank.
    """
    if dist.is_initialized():
        return dist.get_rank()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        dist.init_process_group(
            backend or "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    return dist.get_rank()


def init_model_parallel(mp_size: int | None = None) -> int:
    """Make sure fairscale's model-parallel groups exist and return the model-parallel size.

    Args:
        mp_size: wanted model-parallel size; ``None`` keeps existing groups, or uses the whole
            world (every process one model-parallel rank) when there are none yet.
    """
    maybe_init_dist()
    if fs_init.model_parallel_is_initialized():
        have = fs_init.get_model_parallel_world_size()
        if mp_size is not None and mp_size != have:
            raise ValueError(
                f"model-parallel groups already exist with size {have}, asked for {mp_size}"
            )
        return have
    world = dist.get_world_size()
    mp_size = world if mp_size is None else int(mp_size)
    if mp_size < 1 or world % mp_size:
        raise ValueError(f"model-parallel size {mp_size} must divide the world size {world}")
    with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes
        fs_init.initialize_model_parallel(mp_size)
    return mp_size


def mp_rank() -> int:
    return fs_init.get_model_parallel_rank()


def mp_world_size() -> int:
    return fs_init.get_model_parallel_world_size()


def dp_rank() -> int:
    return fs_init.get_data_parallel_rank()


def dp_world_size() -> int:
    return fs_init.get_data_parallel_world_size()


def make_generator(seed: int, device) -> torch.Generator:
    "The sampling generator: the same seed on every model-parallel rank gives the same tokens."
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)
