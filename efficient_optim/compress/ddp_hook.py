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
iteration (``dropped`` counts them; 0 in a normal run, tested). ``report()["per_iteration"]`` gives the bytes
of each of the last ``keep_iterations`` iterations (what this rank put in its payloads or plain buckets,
what it sent, and each bucket's compressor).

**With a controller** (``controller=``, any ``compress.Controller``): the controller's layers are the model's
parameters (matched by identity), its buckets hold several of them, so each bucket is compressed with the
*most precise* gradient choice among its layers (the spec whose payload for the bucket is the largest; a
layer without a choice counts as the hook's own compressor), re-read at every iteration: a decision taken
in ``controller.step`` after the optimizer step applies from the next iteration on. The residual of a
bucket is kept when its compressor changes (``ErrorFeedback`` stores it in its own residual format, not in
the payload's). The controller observes each layer's gradient *after* the exchange: the averaged, decoded
slice of the bucket that the optimizer will see, the same on every rank, so every rank's controller takes
the same decisions and the payload sizes agree (a controller whose decisions depend on rank-local inputs,
such as each rank's own loss passed to ``step``, must be given the same values on every rank: the
all-gather needs the same payload size everywhere). Build the controller with ``gradients=None`` (the hook
applies the choices per bucket) and ``optimizer=`` if it also plans the momentum; a budget then counts no
per-layer gradient state (the residuals are per bucket).
"""

import threading
from collections import deque

import torch
import torch.distributed as dist

from .base import Compressor
from .feedback import ErrorFeedback, GradientCompressor, NoFeedback, as_gradient_compressor
from .specs import parse_compressor

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
        controller: a ``compress.Controller`` over the model's parameters whose per-layer gradient choices
            set each bucket's compressor and which observes every reduced gradient (module doc; default None:
            every bucket uses ``compressor``). Needs ``compressor`` to be an ``ErrorFeedback`` or
            ``NoFeedback`` (or a plain ``Compressor``).
        keep_iterations: how many of the latest iterations ``per_iteration`` keeps (default 1000).
    """

    def __init__(self, compressor: GradientCompressor | Compressor, process_group=None, params=None,
                 start_iteration: int = 1, controller=None, keep_iterations: int = 1000):  # fmt: skip
        if isinstance(start_iteration, bool) or not isinstance(start_iteration, int) or start_iteration < 0:
            raise ValueError(f"start_iteration must be an integer >= 0, got {start_iteration!r}")
        if isinstance(keep_iterations, bool) or not isinstance(keep_iterations, int) or keep_iterations < 1:
            raise ValueError(f"keep_iterations must be an integer >= 1, got {keep_iterations!r}")
        self.compressor = as_gradient_compressor(compressor)
        self.controller = controller
        self._layer: dict[int, int] = {}  # id(parameter) -> the controller's key for it
        if controller is not None:
            if not all(hasattr(controller, a) for a in ("params", "current", "observe")):
                raise ValueError(f"controller must be an efficient_optim.compress Controller, got {controller!r}")
            if not isinstance(self.compressor, (ErrorFeedback, NoFeedback)):
                raise ValueError(f"a controller sets per-bucket compressors, which {self.compressor.describe()} does not "
                                 "take; use ErrorFeedback(...) or NoFeedback(...)")  # fmt: skip
            self._layer = {id(p): i for i, p in enumerate(controller.params)}
            if params is not None and not any(id(p) in self._layer for p in params):
                raise ValueError("the controller's parameters are none of the model's (build it over "
                                 "list(ddp_model.module.parameters()))")  # fmt: skip
        self._specs: dict[str, Compressor] = {}  # spec -> its compressor (parsed once)
        self._lock = threading.Lock()  # collective callbacks may run on the process group's threads
        self.switches = 0  # times a bucket's compressor changed (a controller decision reached the wire)
        self.per_iteration: deque = deque(maxlen=keep_iterations)  # one record per finished iteration
        self._marks = (0, 0)  # payload_bytes, plain_bytes at the start of the current iteration
        self._buckets: list = []  # the current iteration's [bucket key, compressor description]
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
        """Drop residuals of buckets not seen this iteration (DDP rebuilt its buckets); record its bytes."""
        if self.iterations >= self.start_iteration:
            for key in [k for k in list(self.compressor.calls) if k not in self._seen]:
                self.compressor.reset(key)
                self.dropped += 1
        payload, plain = self.payload_bytes - self._marks[0], self.plain_bytes - self._marks[1]
        w = self.world_size or 1
        self.per_iteration.append({"iteration": self.iterations, "payload_bytes": payload, "plain_bytes": plain,
                                   "sent_bytes": (w - 1) * payload + 2 * (w - 1) / w * plain,
                                   "buckets": self._buckets})  # fmt: skip
        self._marks, self._buckets = (self.payload_bytes, self.plain_bytes), []
        self._seen = set()
        self.iterations += 1

    def _compressor_of(self, spec: str | None) -> Compressor:
        if spec is None:
            return self.compressor.compressor
        if spec not in self._specs:
            self._specs[spec] = parse_compressor(spec)
        return self._specs[spec]

    def bucket_spec(self, params, numel: int) -> str | None:
        """The controller's choice for a bucket of ``params`` (``numel`` elements): the most precise gradient
        spec among its layers, i.e. the one whose payload for the bucket is the largest (ties: the larger spec
        string); None (the hook's compressor) when that is the most precise or there is no controller."""
        if self.controller is None:
            return None
        specs = set()
        for p in params:
            choice = self.controller.current.get(self._layer.get(id(p)))
            specs.add(choice.grad if choice is not None else None)
        return max(specs, key=lambda s: (self._compressor_of(s).nbytes(numel), s or ""))

    def choose(self, key, params, numel: int) -> None:
        """Set bucket ``key``'s compressor to the controller's current choice (``bucket_spec``)."""
        spec = self.bucket_spec(params, numel)
        current = self.compressor.overrides.get(key)
        if (current[0] if current is not None else None) != spec:
            if key in self.compressor.calls:
                self.switches += 1
            self.compressor.set_compressor(key, spec)

    def observe(self, params, grads) -> None:
        """Hand each reduced, finite gradient of a bucket to the controller (``observe(layer, grad)``)."""
        if self.controller is None:
            return
        with self._lock:
            for p, g in zip(params, grads, strict=True):
                layer = self._layer.get(id(p))
                if layer is not None and bool(torch.isfinite(g).all()):
                    self.controller.observe(layer, g)

    def report(self) -> dict:
        """Bytes so far on this rank: ``payload_bytes`` (compressed buckets, flags included), ``plain_bytes``
        (buckets all-reduced uncompressed), ``dense_bytes`` (every bucket uncompressed); ``sent_bytes`` is what
        this rank sends (ring all-gather of the payloads + ring all-reduce of the plain buckets) and
        ``sent_bytes_allreduce`` what plain all-reduce of every bucket would send; ``wire_ratio`` is their ratio;
        ``switches``: times a bucket's compressor changed (controller decisions); ``per_iteration``: per recent
        iteration, its ``payload_bytes``, ``plain_bytes``, ``sent_bytes`` and ``buckets`` ([positions, compressor])."""
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
                "residual_bytes": self.compressor.state_nbytes(), "dropped_residuals": self.dropped,
                "switches": self.switches, "per_iteration": list(self.per_iteration)}  # fmt: skip

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
    params, grads = bucket.parameters(), bucket.gradients()  # views of ``buf``
    state.plain_bytes += buf.numel() * buf.element_size()
    state._buckets.append([list(state.key(bucket)), "plain"])
    if bucket.is_last():
        state.end_iteration()
    fut = dist.all_reduce(buf.div_(world), group=group, async_op=True).get_future()

    def done(f) -> torch.Tensor:
        state.observe(params, grads)
        return f.value()[0]

    return fut.then(done)


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
    params, grads = bucket.parameters(), bucket.gradients()  # views of ``buf``
    state.choose(key, params, buf.numel())
    wire, comp = _encode(state, key, buf.detach().reshape(-1).to(torch.float32))
    state.calls += 1
    state.payload_bytes += wire.numel()
    state._buckets.append([list(key), comp.describe()])
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
        state.observe(params, grads)
        return buf

    return fut.then(decode)


def register_compression_hook(model, compressor: GradientCompressor | Compressor, process_group=None,
                              start_iteration: int = 1, controller=None) -> CompressionHookState:  # fmt: skip
    """Register ``compressed_allreduce_hook`` on the DDP ``model``; returns its state (``report()``).
    Arguments as ``CompressionHookState``'s (``model`` must be a ``DistributedDataParallel``; ``controller``,
    default None, sets each bucket's compressor per iteration and observes the reduced gradients)."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_compression_hook needs a DistributedDataParallel model, got {type(model).__name__}")
    state = CompressionHookState(compressor, process_group, params=list(model.module.parameters()),
                                 start_iteration=start_iteration, controller=controller)  # fmt: skip
    model.register_comm_hook(state, compressed_allreduce_hook)
    return state
