"""A DDP communication hook that sends each gradient bucket compressed, with error feedback.

It plugs into PyTorch's own hook API (``DistributedDataParallel.register_comm_hook``), as PowerSGD does:

    state = register_compression_hook(ddp_model, ErrorFeedback(Quantize(8)))
    ...train as usual...
    state.report()      # bytes this rank put on the wire, and what plain all-reduce would have sent

For each bucket the hook compresses the flat gradient (the error feedback is kept per bucket, compressed),
turns the payload into one ``uint8`` buffer (``Compressor.to_wire``; every rank's is the same size, known from
the bucket's length) after a 4-byte finite flag, exchanges the buffers with ``torch.distributed.all_gather``
and decodes the mean of all ranks' payloads into the bucket. Compressed payloads cannot be summed in
transit (each rank has its own block scales or indices), so the collective is an all-gather, as in PyTorch's
own quantization hooks; per rank it sends ``(W - 1) x payload`` bytes against ``2 (W - 1) / W x dense`` for a
ring all-reduce, so compression pays while ``payload / dense < 2 / W`` (any 8-bit or smaller setting at
2-8 ranks; beyond, the all-gather's growth eats the saving: ``report()`` gives both figures).

A non-finite gradient on any rank is not compressed (that rank's residual is kept); every rank's bucket
becomes NaN, so the optimizer's non-finite policy (or AMP's GradScaler) skips the step everywhere.

DDP rebuilds its buckets once, after the first iteration; so, as PowerSGD's hook does, the first
``start_iteration`` iterations (default 1) are plain all-reduces and compression starts on the final buckets.
Buckets are keyed by the positions of their parameters in the model, so a residual follows a set of
parameters, not a bucket number; a residual whose bucket no longer exists is dropped at the end of the
iteration (``dropped`` counts them; 0 in a normal run, tested).
"""

import torch
import torch.distributed as dist

from .base import Compressor
from .feedback import GradientCompressor, as_gradient_compressor

_FLAG_BYTES = 4  # the float32 finite flag in front of every payload
# DDP checks a hook's annotations against these exact objects (so no ``from __future__ import annotations``)
_GradBucket = dist.GradBucket if dist.is_available() else object


class CompressionHookState:
    """The state of ``compressed_allreduce_hook`` (pass it to ``register_comm_hook``).

    Args:
        compressor: a ``GradientCompressor`` (``ErrorFeedback(Quantize(8))``, ``DGC(...)``) or a plain
            ``Compressor`` (no error feedback).
        process_group: the group to reduce over (default None: the default group).
        params: the model's parameters in order (default None: numbered as the hook first sees them; every
            rank sees them in the same order). ``register_compression_hook`` passes the module's.
        start_iteration: iterations reduced by plain all-reduce before compression starts (default 1: DDP
            rebuilds its buckets after the first iteration).
    """

    def __init__(self, compressor: GradientCompressor | Compressor, process_group=None, params=None,
                 start_iteration: int = 1):  # fmt: skip
        if isinstance(start_iteration, bool) or not isinstance(start_iteration, int) or start_iteration < 0:
            raise ValueError(f"start_iteration must be an integer >= 0, got {start_iteration!r}")
        self.compressor = as_gradient_compressor(compressor)
        self.process_group = process_group
        self.start_iteration = start_iteration
        self._position = {id(p): i for i, p in enumerate(params)} if params is not None else {}
        self.calls = 0  # buckets compressed on this rank
        self.iterations = 0
        self.dropped = 0  # residuals dropped because their bucket no longer exists
        self.payload_bytes = 0  # bytes this rank contributed to the all-gathers (payloads + flags)
        self.plain_bytes = 0  # bytes of the buckets all-reduced uncompressed (the first iterations)
        self.dense_bytes = 0  # bytes of every bucket as it is (what plain all-reduce would reduce)
        self.world_size = None
        self._seen: set = set()

    def key(self, bucket) -> tuple[int, ...]:
        """The bucket's key: its parameters' positions in the model."""
        return tuple(self._position.setdefault(id(p), len(self._position)) for p in bucket.parameters())

    def end_iteration(self) -> None:
        """Drop residuals of buckets not seen this iteration (DDP rebuilt its buckets)."""
        if self.iterations >= self.start_iteration:
            for key in [k for k in list(self.compressor.calls) if k not in self._seen]:
                self.compressor.reset(key)
                self.dropped += 1
        self._seen = set()
        self.iterations += 1

    def report(self) -> dict:
        """Bytes so far on this rank: ``payload_bytes`` (compressed buckets, flags included), ``plain_bytes``
        (buckets all-reduced uncompressed), ``dense_bytes`` (every bucket uncompressed); ``sent_bytes`` is what
        this rank sends (ring all-gather of the payloads + ring all-reduce of the plain buckets) and
        ``sent_bytes_allreduce`` what plain all-reduce of every bucket would send; ``wire_ratio`` is their ratio."""
        w = self.world_size or 1
        ring = 2 * (w - 1) / w
        sent = (w - 1) * self.payload_bytes + ring * self.plain_bytes
        allreduce = ring * self.dense_bytes
        compressed_dense = self.dense_bytes - self.plain_bytes
        return {"world_size": w, "buckets_compressed": self.calls, "iterations": self.iterations,
                "payload_bytes": self.payload_bytes, "plain_bytes": self.plain_bytes, "dense_bytes": self.dense_bytes,
                "compression_ratio": compressed_dense / self.payload_bytes if self.payload_bytes else None,
                "sent_bytes": sent, "sent_bytes_allreduce": allreduce,
                "wire_ratio": allreduce / sent if sent else None,
                "residual_bytes": self.compressor.state_nbytes(), "dropped_residuals": self.dropped}  # fmt: skip

    def state_dict(self) -> dict:
        return {"compressor": self.compressor.state_dict(), "iterations": self.iterations}

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state["compressor"])
        self.iterations = int(state["iterations"])


def _encode(state: CompressionHookState, key, flat: torch.Tensor) -> tuple[torch.Tensor, Compressor]:
    """This rank's wire buffer for ``flat`` (a float32 finite flag, then the payload) and its compressor."""
    finite = bool(torch.isfinite(flat).all())
    if finite:
        payload = state.compressor.compress(key, flat)
        comp = state.compressor.compressor_for(key)
        wire = comp.to_wire(payload)
    else:  # a payload of the right size whose content is ignored: the flag says NaN
        state.compressor.skip(key)
        comp = state.compressor.compressor_for(key)
        wire = torch.zeros(comp.nbytes(flat.numel()), dtype=torch.uint8, device=flat.device)
    flag = torch.tensor([1.0 if finite else float("nan")], dtype=torch.float32, device=flat.device)
    return torch.cat([flag.view(torch.uint8), wire]), comp


def _plain_allreduce(state: CompressionHookState, bucket, group, world: int) -> torch.futures.Future:
    """The bucket averaged by a plain all-reduce (as DDP's default hook does)."""
    buf = bucket.buffer()
    state.plain_bytes += buf.numel() * buf.element_size()
    if bucket.is_last():
        state.end_iteration()
    fut = dist.all_reduce(buf.div_(world), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def compressed_allreduce_hook(state: CompressionHookState, bucket: _GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the ranks from compressed payloads (see the module doc)."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    state.world_size = world
    buf = bucket.buffer()
    state.dense_bytes += buf.numel() * buf.element_size()
    if state.iterations < state.start_iteration:
        return _plain_allreduce(state, bucket, group, world)
    key = state.key(bucket)
    state._seen.add(key)
    wire, comp = _encode(state, key, buf.detach().reshape(-1).to(torch.float32))
    state.calls += 1
    state.payload_bytes += wire.numel()
    gathered = [torch.empty_like(wire) for _ in range(world)]
    fut = dist.all_gather(gathered, wire, group=group, async_op=True).get_future()
    if bucket.is_last():
        state.end_iteration()

    def decode(_fut) -> torch.Tensor:
        total = torch.zeros(buf.numel(), dtype=torch.float32, device=buf.device)
        for w in gathered:
            if not bool(torch.isfinite(w[:_FLAG_BYTES].view(torch.float32)).all()):
                total.fill_(float("nan"))
                break
            total += comp.decompress(comp.from_wire(w[_FLAG_BYTES:], (buf.numel(),)))
        buf.copy_(total.div_(world).view_as(buf))
        return buf

    return fut.then(decode)


def register_compression_hook(model, compressor: GradientCompressor | Compressor, process_group=None,
                              start_iteration: int = 1) -> CompressionHookState:  # fmt: skip
    """Register ``compressed_allreduce_hook`` on the DDP ``model``; returns its state (``report()``).
    Arguments as ``CompressionHookState``'s (``model`` must be a ``DistributedDataParallel``)."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_compression_hook needs a DistributedDataParallel model, got {type(model).__name__}")
    state = CompressionHookState(compressor, process_group, params=list(model.module.parameters()), start_iteration=start_iteration)
    model.register_comm_hook(state, compressed_allreduce_hook)
    return state
