"""What the finetuning loop and the encoder warm-up share: the learning-rate schedule and the
data-parallel gradient average."""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist

from .. import dist


def lr_at(step: int, cfg) -> float:
    """The learning rate of ``step``: linear warm-up, then cosine decay to ``min_lr``.

    ``cfg`` is a :class:`~sphinx_tools.train.config.TrainConfig` or anything with ``lr``,
    ``min_lr``, ``warmup`` and ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def sync_grads(params: list[torch.nn.Parameter]):
    """Average the trainable parameters' gradients over the data-parallel group, in one
    all-reduce. A parameter no rank used keeps no gradient (the optimizer skips it, as with one
    process); one used by some ranks only (a batch without images) counts zeros for the rest."""
    world = dist.dp_world_size()
    if world == 1:
        return
    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    flat = torch.cat(grads + [used])
    torch_dist.all_reduce(flat, group=dist.fs_init.get_data_parallel_group())
    averages = (flat[: -len(params)] / world).split([p.numel() for p in params])
    for p, avg, n in zip(params, averages, flat[-len(params):].tolist()):
        p.grad = avg.view_as(p) if n else None  # views of the one reduced buffer, no copies
