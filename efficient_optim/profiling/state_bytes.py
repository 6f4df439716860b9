"""Exact bytes an optimizer holds for its states, for ours and for any other ``torch.optim.Optimizer``.

Every tensor reachable from ``optimizer.state`` is counted once (storages shared between parameters, like
bitsandbytes' quantization maps, are counted once). Tensor subclasses that wrap inner tensors (torchao's
quantized states) are opened with ``__tensor_flatten__`` so the codes and scales they really hold are
counted, not the size they pretend to have. Optimizers of this library also report the tables they share
across parameters (quantization maps) and any scratch buffers through ``shared_state_tensors()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch


@dataclass
class StateEntry:
    """One state tensor of one parameter.

    Args:
        param: the parameter's name (from ``named_parameters`` when given, else ``param<i>``).
        shape: the parameter's shape.
        numel: the parameter's number of elements.
        key: the state key (``exp_avg.codes``, ``exp_avg_sq``, ``step``, ...).
        dtype: the stored dtype.
        nbytes: bytes the tensor occupies (0 if its storage was already counted).
    """

    param: str
    shape: tuple
    numel: int
    key: str
    dtype: str
    nbytes: int


def _leaf_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Plain tensors holding a (possibly subclassed) tensor's data."""
    if hasattr(t, "_local_tensor"):  # DTensor: count this rank's shard
        return _leaf_tensors(t._local_tensor)
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    out: list[torch.Tensor] = []
    for n in names:
        inner = getattr(t, n)
        if isinstance(inner, torch.Tensor):  # (some subclasses also name non-tensor attributes)
            out.extend(_leaf_tensors(inner))
    return out


def _iter_values(value, prefix: str, depth: int = 0):
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _iter_values(v, f"{prefix}.{k}" if prefix else str(k), depth)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _iter_values(v, f"{prefix}[{i}]", depth)
    elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)) and depth < 3:
        # helper objects kept in the state (GaLore's and APOLLO's projectors hold their projection matrices)
        for k, v in vars(value).items():
            yield from _iter_values(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)


class _Counter:
    def __init__(self):
        self.seen: set[tuple[int, int]] = set()

    def count(self, t: torch.Tensor) -> int:
        total = 0
        for leaf in _leaf_tensors(t):
            if leaf.device.type == "meta":
                continue
            storage = leaf.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key in self.seen:
                continue
            self.seen.add(key)
            total += storage.nbytes() if storage.data_ptr() else leaf.numel() * leaf.element_size()
        return total


def _param_names(optimizer: torch.optim.Optimizer, named_parameters: Iterable | None) -> dict[int, str]:
    names: dict[int, str] = {}
    if named_parameters is not None:
        for n, p in named_parameters:
            names[id(p)] = n
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            names.setdefault(id(p), f"param{i}")
            i += 1
    return names


def state_breakdown(optimizer: torch.optim.Optimizer, named_parameters: Iterable | None = None) -> list[dict]:
    """One row per state tensor per parameter, plus rows for shared tables (``param == "<shared>"``).

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        named_parameters: optional ``model.named_parameters()`` to label rows with parameter names.
    """
    names = _param_names(optimizer, named_parameters)
    counter = _Counter()
    rows: list[dict] = []
    for p, st in optimizer.state.items():
        for key, t in _iter_values(st, ""):
            rows.append(
                asdict(StateEntry(names.get(id(p), "?"), tuple(p.shape), p.numel(), key, str(t.dtype), counter.count(t)))
            )
    shared = getattr(optimizer, "shared_state_tensors", None)
    if callable(shared):
        for key, t in shared().items():
            rows.append(asdict(StateEntry("<shared>", (), 0, key, str(t.dtype), counter.count(t))))
    return rows


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of every tensor the optimizer holds for its states (each storage counted once)."""
    return sum(r["nbytes"] for r in state_breakdown(optimizer))


def bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """``state_bytes`` divided by the number of parameters the optimizer updates."""
    n = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return state_bytes(optimizer) / max(n, 1)
