"""Every distributed concern in one place: process groups, fairscale model-parallel groups,
seeding and rank-0 printing. Other code gets a ready model and never checks ranks.

No process opens a socket that it does not need. A one-process world (a plain
``SphinxModel.from_pretrained``, ``serve``, ``label`` without torchrun) opens none at all. A
multi-process world listens only where its launcher says: torchrun's rendezvous address, or the
loopback interface for the worlds :func:`init_local_world` starts on this machine.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import socket

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init
from torch.distributed.constants import default_pg_timeout

# the variables that choose the network interface of gloo's and NCCL's own connections
SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def maybe_init_dist(backend: str | None = None) -> int:
    """Join the world described by ``RANK`` / ``WORLD_SIZE`` (torchrun), else start a one-process
    world.

    The one-process world opens no socket: all its collectives are identities, which torch's
    communication-free ``fake`` backend computes exactly (it copies inputs to outputs), over an
    in-memory store. fairscale's model-parallel groups work on it as on any other world.

    A multi-process world meets at ``MASTER_ADDR:MASTER_PORT``. Under torchrun every process is a
    client of torchrun's own store. Launched by hand, rank 0 hosts the store, listening on
    ``MASTER_ADDR`` only (torch's own env:// store would listen on every interface). When that
    address is a loopback one, gloo's and NCCL's connections also stay on the loopback interface
    unless ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` say otherwise.

    Returns:
        This process's global rank.
    """
    if dist.is_initialized():
        return dist.get_rank()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        _init_env_world(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        _init_single_process_world()
    return dist.get_rank()


def _init_single_process_world():
    # registers the "fake" backend with torch.distributed (a no-op when torch already has it)
    import torch.testing._internal.distributed.fake_pg  # noqa: F401

    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=1)


def _init_env_world(backend: str):
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"RANK and WORLD_SIZE are set but {var} is not: launch with "
                               "torchrun, or set MASTER_ADDR and MASTER_PORT")
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if _is_loopback(addr):  # every process is on this machine (torchrun --standalone: localhost)
        _pin_to_loopback(override=False)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend)  # env://: a client of the torchrun agent's store
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == 0:
        listener = _listen(addr, port)
        try:
            store = dist.TCPStore(addr, port, world, True, default_pg_timeout,
                                  master_listen_fd=listener.fileno())
        except BaseException:
            listener.close()
            raise
        listener.detach()  # the store's server owns the socket now
    else:
        store = dist.TCPStore(addr, port, world, False, default_pg_timeout)
    # the same key prefix as env:// gives its stores, so ranks started either way meet
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world)


def _listen(addr: str, port: int) -> socket.socket:
    "A socket listening on ``addr:port`` only (the first of its addresses that can be bound)."
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise RuntimeError(f"cannot resolve MASTER_ADDR {addr!r}: {e}") from None
    error = None
    for family, kind, proto, _, sockaddr in infos:
        s = socket.socket(family, kind, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
            s.listen(128)
            return s
        except OSError as e:
            s.close()
            error = e
    raise RuntimeError(f"cannot listen on MASTER_ADDR:MASTER_PORT {addr}:{port}: {error}")


def _is_loopback(addr: str) -> bool:
    try:
        infos = socket.getaddrinfo(addr, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def loopback_interface() -> str | None:
    "The name of this machine's IPv4 loopback interface (``lo`` on Linux, ``lo0`` on macOS)."
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and ipaddress.ip_address(a.address).is_loopback
               for a in addrs):
            return name
    return None


def _pin_to_loopback(override: bool):
    # gloo and NCCL otherwise bind the address this machine's host name resolves to
    name = loopback_interface()
    if name is None:
        return
    for var in SOCKET_IFNAME_VARS:
        if override or not os.environ.get(var):
            os.environ[var] = name


def init_local_world(rank: int, world: int, store_file, backend: str = "gloo") -> int:
    """Join a world of ``world`` processes on this machine.

    The processes meet in ``store_file`` (a ``FileStore``: no port, no listening store), and
    gloo's and NCCL's connections between them stay on the loopback interface. Every process
    passes the same new file path, whose folder exists; the file is removed when the last
    process lets go of it.

    Args:
        rank: this process's rank, ``0 <= rank < world``.
        world: the number of processes.
        store_file: the meeting file (``str`` or ``Path``).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per process; set the device first).

    Returns:
        This process's global rank.
    """
    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    _pin_to_loopback(override=True)
    store = dist.FileStore(str(store_file), world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
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
