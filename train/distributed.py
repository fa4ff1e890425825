"""Collectives with gradients that work on gloo (CPU) and NCCL.

torch.distributed.nn's all_gather backward uses all_to_all off NCCL, which gloo lacks; these use
all_reduce only. Gradient convention: every process computes the *same* global loss from gathered
tensors and DDP averages gradients over processes, so the backward of a gather (or sum) is the
all-reduced *sum* of the incoming gradients (restricted to this rank's slice): the average over
processes of those sums is exactly the single-process gradient of the global loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        rank, ws = world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """cat over ranks along dim 0 (equal shapes on every rank); identity with one process."""
    if world()[1] == 1:
        return x
    return _AllGather.apply(x)


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; identity with one process."""
    if world()[1] == 1:
        return x
    return _AllReduce.apply(x)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


@torch.no_grad()
def all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """cat over ranks of tensors whose first dimension differs between ranks (padded exchange)."""
    if world()[1] == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = all_gather_nograd(n).tolist()
    m = max(sizes)
    pad = torch.zeros((m - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    full = all_gather_nograd(torch.cat([x, pad], 0))
    return torch.cat([full[i * m:i * m + s] for i, s in enumerate(sizes)], 0)


def all_reduce_flag(flag: bool, device) -> bool:
    """True if `flag` is True on any rank."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient); a copy with one process."""
    x = x.clone()
    if world()[1] > 1:
        dist.all_reduce(x)
    return x


_HOST_GROUP = None


def host_group():
    """A gloo process group over the same ranks, for small host-side exchanges (batch lengths):
    on NCCL a collective of a CUDA tensor followed by .item() waits for everything queued on the
    GPU before it; over gloo it costs a few microseconds of CPU and no wait. Created on first use,
    which must happen on every rank at the same call (all callers are collective anyway)."""
    global _HOST_GROUP
    default = dist.distributed_c10d._get_default_group()
    if _HOST_GROUP is None or _HOST_GROUP[0] is not default:  # a new default group: a new side group
        group = default if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        _HOST_GROUP = (default, group)
    return _HOST_GROUP[1]


def all_gather_host_ints(n: int) -> list[int]:
    """Every rank's int (rank order), exchanged on the host; [n] with one process."""
    if world()[1] == 1:
        return [n]
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(world()[1])]
    dist.all_gather(out, torch.tensor([n], dtype=torch.int64), group=host_group())
    return [int(t) for t in out]
