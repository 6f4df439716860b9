"""Distributed checkpoints of a model and one of this library's optimizers, with ``torch.distributed.checkpoint``.

The optimizers need no wrapper under DDP or FSDP2 (see ``state.sharded`` and docs/distributed.md), and
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` + ``dcp.save`` / ``dcp.load`` work on them as
on ``torch.optim.AdamW``. These helpers do that in one call each and add one check: a checkpoint whose
states cannot be re-cut for this run's sharding (quantized states saved from another world size) is
refused *before* anything is read, with an error naming the parameter, instead of DCP's size mismatch::

    from efficient_optim.integrations.distributed import load_checkpoint, save_checkpoint

    save_checkpoint("ckpt/step-1000", model, optimizer)      # every rank calls it
    ...
    load_checkpoint("ckpt/step-1000", model, optimizer)      # same world size for quantized states

Works on one process without a process group too (DCP then reads and writes locally).
"""

from __future__ import annotations

import os

import torch

from ..state import sharded


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(checkpoint_id: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None) -> None:  # fmt: skip
    """Save ``model`` and ``optimizer`` (and the ``extra`` entries: a step counter, a ``Stateful`` scheduler...)
    with ``torch.distributed.checkpoint`` into the folder ``checkpoint_id``. Called by every rank."""
    import torch.distributed.checkpoint as dcp

    state = _state(model, optimizer)
    state.update(extra or {})
    dcp.save(state, checkpoint_id=checkpoint_id)


def local_shard_keys(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """Flattened DCP keys of the optimizer states kept on each rank's local shard -> the parameter's name.

    These are the states that load only into the same sharding (quantized codes and scales of DTensor
    parameters); every other state reshards.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for _, p, _, _, key in sharded._local_keys(optimizer, dtensor_only=False) if hasattr(optimizer, "codecs") else ():
        name = names.get(id(p), "?").replace("_orig_mod.", "")
        out[f"optim.state.{name}.{key}"] = name
    return out


def check_checkpoint(checkpoint_id: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` if the checkpoint's tensors do not fit this run's (shapes or sharding).

    The message names the parameter and, for a local-shard state, explains why it cannot reshard.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    metadata = dcp.FileSystemReader(os.fspath(checkpoint_id)).read_metadata()
    flat, _ = flatten_state_dict(_state(model, optimizer))
    local_keys = local_shard_keys(model, optimizer)
    for key, value in flat.items():
        md = metadata.state_dict_metadata.get(key)
        if not isinstance(value, torch.Tensor) or md is None or not hasattr(md, "size"):
            continue
        if tuple(md.size) == tuple(value.shape):
            continue
        if key in local_keys:
            raise ValueError(
                f"optimizer state {key!r} of parameter {local_keys[key]!r} was saved with another sharding of the "
                f"parameter than this run's (saved {tuple(md.size)}, here {tuple(value.shape)}; a sharded layout is "
                "(shards, elements of the largest shard)): "
                "quantized states are blocked on each rank's shard, so they load only into the same world size and "
                "mesh. Resume with the checkpoint's world size (dense, factored and low-rank states reshard freely)"
            )
        raise ValueError(f"checkpoint tensor {key!r} is {tuple(md.size)} but this run's is {tuple(value.shape)}: "
                         "the model or optimizer settings differ from the checkpoint's")  # fmt: skip


def load_checkpoint(checkpoint_id: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None) -> None:  # fmt: skip
    """Load what ``save_checkpoint`` wrote into ``model`` and ``optimizer`` (and ``extra``, in place), after
    ``check_checkpoint``. Called by every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    check_checkpoint(checkpoint_id, model, optimizer)
    state = _state(model, optimizer)
    state.update(extra or {})
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
