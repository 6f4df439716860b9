"""DTensor (FSDP2) shards as the state codecs see them: this rank's part of a tensor, a local tensor as a DTensor
again, pending partial reductions completed, the global position of a shard (for stochastic rounding), the
placements of a statistic that reduces a sharded dim, and the agreement of all ranks on a non-finite gradient.
The codecs' layouts on a shard (``ShardLocal``, ``ShardedDense``, ...) are in ``state.sharded``.
"""

from __future__ import annotations

import math

import torch

from ..quant.rounding import mix_salt

try:  # torch.distributed may be compiled out
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None

_GOLDEN = 0x9E3779B9  # the hash's counter multiplier (quant.rounding.uniform_from_hash, kernels/cpu_adamw.cpp)
_MASK32 = 0xFFFFFFFF


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an alias: in-place changes reach the DTensor); ``t`` otherwise."""
    return t.to_local() if is_dtensor(t) else t


def as_dtensor(x: torch.Tensor, like) -> torch.Tensor:
    """The local tensor ``x`` (shaped like ``like``'s shard) as a DTensor with ``like``'s layout."""
    return DTensor.from_local(x, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())  # fmt: skip


def resolve_partial(t: torch.Tensor) -> torch.Tensor:
    """A DTensor whose pending partial reductions (sums, means over a sharded dim) are completed; ``t`` as is
    otherwise. (``float()`` of a partial DTensor would return this rank's part only.)"""
    if is_dtensor(t) and any(pl.is_partial() for pl in t.placements):
        return t.redistribute(t.device_mesh, [Replicate() if pl.is_partial() else pl for pl in t.placements])
    return t


def resolved_local(value: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor value, reducing pending partial sums first."""
    return resolve_partial(value).to_local()


def shard_salt(salt: int, t) -> int:
    """The stochastic-rounding salt for the local shard of DTensor ``t``.

    The hash draws ``fmix32(i * golden + salt)`` for element ``i``; for a shard that is one contiguous
    range of the global tensor starting at flat offset ``o`` (dim-0 sharding), adding ``o * golden`` to the
    salt draws for local element ``i`` the number of global element ``o + i``. Other shardings mix their
    offsets into the salt (reproducible, not equal to the unsharded draws).
    """
    if not is_dtensor(t):
        return salt
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape[1:]) == tuple(t.shape[1:]):
        row = math.prod(t.shape[1:])
        return (salt + offset[0] * row * _GOLDEN) & _MASK32 if shape else salt
    return mix_salt(salt, *offset)


def shape_carrier(shape, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` holding no memory (an expanded scalar): codecs read only its shape/dtype/device."""
    return torch.empty((), dtype=like.dtype, device=like.device).expand(*shape)


def max_local_shape(param) -> tuple[int, ...]:
    """The largest shard shape of DTensor ``param`` over the ranks (``torch.chunk`` semantics: the first)."""
    shape = list(param.shape)
    for mesh_dim, pl in enumerate(param.placements):
        if pl.is_shard():
            d = pl.dim % len(shape)
            shape[d] = -(-shape[d] // param.device_mesh.size(mesh_dim))
    return tuple(shape)


def zeros_with_placements(shape, like, placements, dtype=torch.float32) -> torch.Tensor:
    """A zero DTensor of global ``shape`` on ``like``'s mesh with ``placements`` (local memory only)."""
    local_shape, _ = compute_local_shape_and_global_offset(torch.Size(shape), like.device_mesh, placements)
    data = torch.zeros(local_shape, dtype=dtype, device=local(like).device)
    return DTensor.from_local(data, like.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=contiguous_stride(shape))  # fmt: skip


def contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


def reduced_placements(param, dropped: int) -> list | None:
    """Placements of a statistic of ``param`` that averages over dim ``dropped`` (negative index).

    A shard along a kept dim stays a shard (renumbered); one along the dropped dim becomes a replica
    (the statistic is reduced across ranks). None when a placement is not a plain ``Shard``/``Replicate``.
    """
    ndim = param.dim()
    dropped %= ndim
    out = []
    for pl in param.placements:
        if type(pl) is Replicate:
            out.append(Replicate())
        elif type(pl) is Shard:
            d = pl.dim % ndim
            out.append(Replicate() if d == dropped else Shard(d if d < dropped else d - 1))
        else:
            return None
    return out


def shards_rows_only(param) -> bool:
    """Whether DTensor ``param`` is replicated or sharded along dim 0 only on every mesh dim (FSDP2's layout)."""
    return all(type(pl) is Replicate or (type(pl) is Shard and pl.dim % max(param.dim(), 1) == 0)
               for pl in param.placements)  # fmt: skip


def first_nonfinite(work, check) -> int | None:
    """The first parameter index whose gradient is not finite, agreed by every rank holding DTensor shards.

    ``check(tensor) -> bool`` tests one plain tensor. For DTensor gradients each rank tests its shard and
    the ranks all-reduce the minimum bad index over each mesh (one int64 per mesh dimension), so either
    every rank skips the step or none does.
    """
    bad, meshes = None, {}
    for _, items in work:
        for index, _, g in items:
            if is_dtensor(g):
                meshes.setdefault(g.device_mesh, None)
                g = g.to_local()
            if bad is None and g.numel() and check(g):
                bad = index
    if not meshes:
        return bad
    import torch.distributed as dist

    none = torch.iinfo(torch.int64).max
    for mesh in meshes:
        flag = torch.tensor([none if bad is None else bad], dtype=torch.int64, device=mesh.device_type)
        for dim in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
        bad = None if int(flag) == none else int(flag)
    return bad
