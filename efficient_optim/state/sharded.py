"""State codecs on sharded parameters: FSDP2 (``fully_shard``) and other DTensor parallelism.

Under FSDP2 every parameter is a ``DTensor``: each rank holds a shard (rows of dim 0 by default), receives
the gradient of that shard, and steps it. The library's optimizers handle this without a sharding layer
of their own:

- The update rule sees the parameter, its gradient and the decoded states as DTensors. Element-wise
  arithmetic stays local; any reduction a rule does (a mean, a norm) is computed by DTensor over the
  *global* tensor, so a rule means on 2 ranks what it means on 1. (A rule that turns a reduction into a
  Python number must take ``.full_tensor()`` first when it is a DTensor: ``float()`` of a partial
  reduction returns this rank's part only.)
- Eligibility for compression is decided on the global shape: ``DTensor.numel()`` and ``.shape`` are the
  global ones, which ``policy.specs.global_numel`` and every codec read.
- Each codec's *storage* follows the sharding as the codec's own ``for_dtensor(param)`` says (default,
  ``StateCodec.for_dtensor``: the local shard's state for an ``is_elementwise`` codec, else the whole state
  on every rank):

  ============================  ===========================================  =========================
  codec                         storage on each rank                         communication per encode
  ============================  ===========================================  =========================
  ``Dense``                     a DTensor with the parameter's placements    none
  ``Quantized`` (+ error        codes/scales of the local shard (blocks      none
  feedback over element-wise    start at the shard's first element)
  codecs)
  ``Factored``                  row/column statistics as DTensors: sharded   all-reduce of C floats
                                along sharded dims, replicated across them   (+1 to decode) per matrix
  ``LowRank`` (dim-0 shards)    ``U`` row-sharded, ``V`` and meta replicated all-reduce of n*r floats;
                                                                             a refresh all-gathers X
  anything else (the default)   kept whole on every rank (warns once)        all-gather of the value
  ============================  ===========================================  =========================

  Stochastic rounding of a shard draws the random numbers of each element's *global* position (the
  counter-based hash is shifted by the shard's flat offset), so when block boundaries fall on shard
  boundaries a sharded run stores exactly what one process would.

Checkpoints: states kept as DTensors reshard freely with ``torch.distributed.checkpoint``. Local-shard
states (quantized codes and scales) are exported by ``state_dict()`` as DTensors of shape
``(shards, max_local_numel)``, one padded row per shard, which DCP saves and restores per rank; they load
only into the same sharding of the parameter (``load_local_states`` raises a ``ValueError`` naming the
parameter otherwise, and DCP itself refuses the size mismatch).

What a shard is (``is_dtensor``, ``local``, ``shard_salt``, ``resolve_partial``, ``first_nonfinite``, ...)
lives in ``state.dtensor_shards``; those names are importable from here too. See docs/distributed.md for
the design and its costs.
"""

from __future__ import annotations

import math
import warnings

import torch

from .codec import StateCodec
from .dense import Dense, round_to_bf16_stochastic
from .dtensor_shards import (
    as_dtensor,
    compute_local_shape_and_global_offset,
    contiguous_stride,
    first_nonfinite,  # noqa: F401 (the optimizers call it as sharded.first_nonfinite)
    is_dtensor,
    local,
    max_local_shape,
    resolve_partial,
    resolved_local,
    shape_carrier,
    shard_salt,
    zeros_with_placements,
)
from .factored import TINY, Factored
from .lowrank import LowRank

try:  # torch.distributed may be compiled out
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None


# ------------------------------------------------------------------------------------------ adapters
class ShardAdapter(StateCodec):
    """A codec adapted to the sharding of a DTensor parameter; ``inner`` is the codec it stands for (and
    describes itself as)."""

    def __init__(self, inner: StateCodec):
        self.inner = inner

    def __repr__(self):
        return f"{type(self).__name__}({self.inner!r})"

    def nbytes(self, state, name):
        return self.inner.nbytes(state, name)

    def shared_tensors(self):
        return self.inner.shared_tensors()

    @property
    def is_dense_fp32(self) -> bool:
        return self.inner.is_dense_fp32

    def for_dtensor(self, param) -> StateCodec:
        return self  # already adapted

    @property
    def error_kind(self) -> str:
        return self.inner.error_kind

    def error_kind_for(self, param) -> str:
        return self.inner.error_kind_for(param)

    def describe(self, param=None) -> str:
        return self.inner.describe(param)

    @property
    def is_elementwise(self) -> bool:
        return self.inner.is_elementwise

    @property
    def scale_block_size(self) -> int | None:
        return self.inner.scale_block_size

    def codebook(self, state, name):
        return self.inner.codebook(state, name)

    def kernel_operands(self, state, name):
        """The inner codec's storage (its ``kernel_kind`` is not claimed: the fused table steps shards only
        through ``kernels.dispatch``'s own unwrapping)."""
        return self.inner.kernel_operands(state, name)


class ShardLocal(ShardAdapter):
    """An element-wise codec (``Quantized``, error feedback over one) stored for the local shard only.

    The rule gets a DTensor view of the decoded shard; ``encode`` stores the local part of the value with
    the salt shifted to the shard's global position.
    """

    def expected(self, name, param):
        return self.inner.expected(name, local(param))

    def init(self, state, name, param):
        self.inner.init(state, name, local(param))

    def decode(self, state, name, param):
        x = self.inner.decode(state, name, local(param))
        return as_dtensor(x, param) if is_dtensor(param) else x

    def residual_value(self, state, name, param):
        e = self.inner.residual_value(state, name, local(param))
        return as_dtensor(e, param) if e is not None and is_dtensor(param) else e

    def encode(self, state, name, value, *, salt=0, **kw):
        if is_dtensor(value):
            salt = shard_salt(salt, value)
            value = resolved_local(value)
        self.inner.encode(state, name, value, salt=salt, **kw)


class ShardedDense(ShardAdapter):
    """A dense state stored as a DTensor with the parameter's placements."""

    def expected(self, name, param):
        return self.inner.expected(name, param)

    def init(self, state, name, param):
        state[name] = torch.zeros_like(param, dtype=self.inner.dtype)

    def decode(self, state, name, param):
        return self.inner.decode(state, name, param)

    def encode(self, state, name, value, *, salt=0, **kw):
        t = state[name]
        if value is t:
            return
        if self.inner.rounding == "stochastic" and is_dtensor(value):
            local(t).copy_(round_to_bf16_stochastic(resolved_local(value), shard_salt(salt, value)))
        else:
            t.copy_(value)

class ShardedFactored(ShardAdapter):
    """Row/column statistics of a sharded matrix kept as DTensors, so they are those of the global matrix.

    For FSDP2's dim-0 (row) shards of an (R, C) matrix: the row statistic is sharded like the rows (no
    communication), the column statistic is replicated: each encode all-reduces C column sums, each
    decode one number (the mean of the row statistic). ``Factored``'s own decode/encode run unchanged on
    the DTensors; this adapter only lays the storage out.
    """

    def __init__(self, inner: Factored, row_placements, col_placements):
        if not isinstance(inner, Factored):
            raise ValueError(f"ShardedFactored lays out a Factored codec, got {inner!r}")
        super().__init__(inner)
        self.row_placements, self.col_placements = row_placements, col_placements

    def expected(self, name, param):
        return self.inner.expected(name, param)

    def init(self, state, name, param):
        if not self.inner.factors(param):
            state[name] = torch.zeros_like(param, dtype=torch.float32)
            return
        shape = tuple(param.shape)
        state[f"{name}.row"] = zeros_with_placements(shape[:-1], param, self.row_placements)
        state[f"{name}.col"] = zeros_with_placements(shape[:-2] + shape[-1:], param, self.col_placements)

    def decode(self, state, name, param):
        if not self.inner.factors(param):
            return state[name]
        row, col = state[f"{name}.row"], state[f"{name}.col"]
        # Factored.decode's arithmetic; the global mean may come back as a pending (partial) DTensor reduction,
        # which must be completed before an in-place clamp
        scale = resolve_partial(row.mean(dim=-1, keepdim=True)).clamp_min_(getattr(self.inner, "eps", TINY))
        return (row / scale).unsqueeze(-1) * col.unsqueeze(-2)

    def encode(self, state, name, value, *, salt=0, **kw):
        if name in state:
            if state[name] is not value:
                state[name].copy_(value)
            return
        self.inner.encode(state, name, value, salt=salt)


class ShardedLowRank(ShardAdapter):
    """Low-rank factors of a matrix sharded by rows (FSDP2), laid out so decoding needs no communication.

    ``LowRank`` orients the parameter's matrix P (d0 x rest) as X = (short side) x (long side) and keeps
    ``X ~ U V^T``. The factor whose rows are P's rows is sharded like P, the other one replicated:

    - d0 the short side (X = P): ``U`` row-sharded, ``V`` replicated. Between refreshes
      ``V = X^T U = sum_r P_r^T U_r``: one all-reduce of (long side x r) floats per encode.
    - d0 the long side (X = P^T): ``V`` row-sharded, ``U`` replicated. Between refreshes ``V_r = P_r U``:
      no communication at all.

    A refresh (randomized or exact SVD; every encode of ``refresh="online"``) needs the whole matrix: it
    all-gathers P and the sharded factor, runs the codec's own encode on them (identically on every rank:
    same numbers, same seeded test matrices) and keeps this rank's rows — what one process computes.
    """

    def __init__(self, inner: LowRank):
        if not isinstance(inner, LowRank):
            raise ValueError(f"ShardedLowRank lays out a LowRank codec, got {inner!r}")
        super().__init__(inner)

    def _sharded_key(self, name, param) -> str:
        return f"{name}.v" if self.inner.oriented_shape(param)[2] else f"{name}.u"

    def expected(self, name, param):
        return self.inner.expected(name, param)

    def init(self, state, name, param):
        if not self.inner.is_lowrank(param):
            state[name] = torch.zeros_like(param, dtype=torch.float32)
            return
        replicated, sharded_key = [Replicate()] * param.device_mesh.ndim, self._sharded_key(name, param)
        for key, (shape, dtype) in self.inner.expected(name, param).items():
            state[key] = zeros_with_placements(shape, param, param.placements if key == sharded_key else replicated, dtype)

    def decode(self, state, name, param):
        if name in state:
            return state[name]
        u, v = local(state[f"{name}.u"]), local(state[f"{name}.v"])
        out = v @ u.t() if self.inner.oriented_shape(param)[2] else u @ v.t()  # this rank's rows of P
        if self.inner.nonnegative:
            out.square_()
        return as_dtensor(out.view(local(param).shape), param)

    def encode(self, state, name, value, *, salt=0, workspace=None, **kw):
        if name in state:
            if state[name] is not value:
                state[name].copy_(value)
            return
        u, v, meta = (state[f"{name}.{k}"] for k in ("u", "v", "meta"))
        transposed = self.inner.oriented_shape(value)[2]
        shard = v if transposed else u
        count, every = int(local(meta)[0]), self.inner.refresh_every
        if count == 0 or (every > 0 and count % every == 0) or self.inner.refresh == "online":
            full = shard.full_tensor()
            tmp = {f"{name}.u": local(u), f"{name}.v": local(v), f"{name}.meta": local(meta)}
            tmp[f"{name}.v" if transposed else f"{name}.u"] = full
            self.inner.encode(tmp, name, value.full_tensor(), salt=salt, workspace=workspace)
            _, offset = compute_local_shape_and_global_offset(shard.shape, shard.device_mesh, shard.placements)
            rows = local(shard)
            rows.copy_(full[offset[0] : offset[0] + rows.shape[0]])
            return
        p = resolved_local(value)
        x = p.reshape(p.shape[0], -1).float()  # this rank's rows of P
        if self.inner.nonnegative:
            x = x.clamp_min(0).sqrt_()
        if transposed:  # V_r = P_r U
            torch.mm(x, local(u), out=local(v))
        else:  # V = sum over ranks of P_r^T U_r
            part = DTensor.from_local(x.t() @ local(u), u.device_mesh,
                                      [Partial() if pl.is_shard() else Replicate() for pl in u.placements],
                                      run_check=False)  # fmt: skip
            local(v).copy_(part.redistribute(u.device_mesh, [Replicate()] * u.device_mesh.ndim).to_local())
        local(meta)[0] += 1


class Replicated(ShardAdapter):
    """Fallback for codecs with no sharded implementation: the state of the whole tensor on every rank.

    ``encode`` all-gathers the value (as much traffic as FSDP's parameter all-gather) and every rank
    encodes the same numbers; ``decode`` slices this rank's part. Correct for the global tensor, but
    neither the memory nor the traffic is sharded: a one-time warning says so.
    """

    _warned: set = set()

    def __init__(self, inner):
        super().__init__(inner)
        kind = type(inner).__name__
        if kind not in Replicated._warned:
            Replicated._warned.add(kind)
            warnings.warn(f"{kind} has no sharded implementation: on DTensor parameters its state is kept whole on "
                          "every rank and the value is all-gathered at each step", RuntimeWarning, stacklevel=4)  # fmt: skip

    def expected(self, name, param):
        return self.inner.expected(name, shape_carrier(param.shape, local(param)))

    def init(self, state, name, param):
        self.inner.init(state, name, shape_carrier(param.shape, local(param)))

    def decode(self, state, name, param):
        from torch.distributed.tensor import distribute_tensor

        full = self.inner.decode(state, name, shape_carrier(param.shape, local(param)))
        return distribute_tensor(full.contiguous(), param.device_mesh, param.placements, src_data_rank=None)

    def residual_value(self, state, name, param):
        from torch.distributed.tensor import distribute_tensor

        e = self.inner.residual_value(state, name, shape_carrier(param.shape, local(param)))
        return None if e is None else distribute_tensor(e.contiguous(), param.device_mesh, param.placements,
                                                          src_data_rank=None)  # fmt: skip

    def encode(self, state, name, value, *, salt=0, **kw):
        if is_dtensor(value):
            value = value.full_tensor()
        self.inner.encode(state, name, value, salt=salt, **kw)


# --------------------------------------------------------------------------------------- dispatch
def _stored_per_shard(codec: StateCodec) -> bool:
    """Whether ``codec`` (of a plain parameter) would keep the state of a DTensor parameter as this rank's
    shard's alone (``ShardLocal``): element-wise codecs other than ``Dense`` (a DTensor state of its own)."""
    return codec.is_elementwise and not isinstance(codec, Dense)


# ------------------------------------------------------------------------------------ checkpoints
def _layout(param) -> tuple[list[int], list]:
    """Mesh dims that shard ``param``, and the placements of a ``(shards..., n)`` layout tensor."""
    dims = [i for i, pl in enumerate(param.placements) if pl.is_shard()]
    placements = [Shard(dims.index(i)) if i in dims else Replicate() for i in range(param.device_mesh.ndim)]
    return dims, placements


def _layout_shape(codec: ShardLocal, name: str, key: str, param) -> tuple[int, ...]:
    dims, _ = _layout(param)
    shape, _ = codec.inner.expected(name, shape_carrier(max_local_shape(param), local(param)))[key]
    return tuple(param.device_mesh.size(i) for i in dims) + (math.prod(shape),)


def _local_keys(opt, dtensor_only: bool = True):
    """Yields ``(index, param, codec, state name, key)`` of every local-shard state of DTensor parameters;
    with ``dtensor_only=False`` also the states of plain parameters that would be local-shard states if the
    parameter were sharded (element-wise, non-dense codecs)."""
    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if is_dtensor(p) or not dtensor_only:
                for name, codec in opt.codecs(p, group).items():
                    if isinstance(codec, ShardLocal) or (not is_dtensor(p) and _stored_per_shard(codec)):
                        for key in codec.expected(name, p):
                            yield index, p, codec, name, key
            index += 1


def export_local_states(opt, state_dict: dict) -> dict:
    """Replace, in a ``state_dict()`` (not in the optimizer), every local-shard state tensor by a DTensor of
    shape ``(shards..., max_local_numel)``: this rank's flat state, zero-padded, in its row."""
    states, copied = state_dict["state"], set()
    for index, p, codec, name, key in _local_keys(opt):
        t = states.get(index, {}).get(key)
        if t is None or is_dtensor(t):
            continue
        if index not in copied:  # a new per-parameter dict: the optimizer's own state is not touched
            states[index] = dict(states[index])
            copied.add(index)
        shape = _layout_shape(codec, name, key, p)
        flat = t.reshape(-1)
        if flat.numel() < shape[-1]:
            flat = torch.cat([flat, flat.new_zeros(shape[-1] - flat.numel())])
        dims, placements = _layout(p)
        data = flat.view((1,) * len(dims) + (shape[-1],))
        states[index][key] = DTensor.from_local(data, p.device_mesh, placements, run_check=False,
                                                shape=torch.Size(shape), stride=contiguous_stride(shape))  # fmt: skip
    return state_dict


def load_local_states(opt) -> None:
    """After ``load_state_dict``: turn exported ``(shards..., n)`` DTensors back into local shard states.

    Raises ``ValueError`` naming the parameter when the checkpoint was written with another sharding of
    it (another world size or mesh): quantized blocks start at each shard's first element, so such a
    state cannot be re-cut without decoding it.
    """
    for index, p, codec, name, key in _local_keys(opt):
        st = opt.state.get(p)
        t = None if not st else st.get(key)
        if t is None:
            continue
        shape, dtype = codec.expected(name, p)[key]
        if not is_dtensor(t) and tuple(t.shape) == tuple(shape):
            continue  # already a local state (a per-rank checkpoint)
        want = _layout_shape(codec, name, key, p)
        if tuple(t.shape) != want:
            raise ValueError(
                f"state {key!r} of parameter #{index} (global shape {tuple(p.shape)}) was saved from another "
                f"sharding: layout {tuple(t.shape)}, this run needs {want} (shards of the parameter x elements "
                "of the largest shard). Quantized states are blocked on each rank's shard and load only into "
                "the same number of shards (same world size and mesh); resume with the checkpoint's world size"
            )
        if is_dtensor(t):
            row = t.to_local().reshape(-1)
        else:  # a full (gathered) layout: this rank's row
            dims, _ = _layout(p)
            coord = p.device_mesh.get_coordinate()
            row = t[tuple(coord[i] for i in dims)].reshape(-1)
        st[key] = row[: math.prod(shape)].reshape(shape).to(dtype).clone()
