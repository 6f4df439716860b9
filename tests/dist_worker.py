"""One rank of the 2-process scenarios that tests/test_distributed.py checks (not collected by pytest).

    python tests/dist_worker.py RANK WORLD_SIZE STORE_FILE OUT_DIR

Every scenario trains the same small MLP on the same batches: under DDP and FSDP2 each rank takes its
half of every batch, the single-process reference the whole batch. Rank 0 writes ``OUT_DIR/results.json``;
after the 2-rank phase it loads the 2-rank checkpoints in a single process (another world size).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from efficient_optim import create_optimizer, state_bytes  # noqa: E402
from efficient_optim.integrations.distributed import load_checkpoint, save_checkpoint  # noqa: E402
from efficient_optim.state import sharded  # noqa: E402

LR, STEPS, BATCH = 3e-3, 6, 32
# (name, registry name, kwargs). Shapes of the model below: 96x64 (6144 elements: quantized on the global
# size although each rank holds 3072 < 4096), 128x96 (shards start on a block boundary), 37x128 (uneven
# shards, 19 and 18 rows; the second starts mid-block at 8 bits, on a boundary at 4 bits), small head.
OPTIMIZERS = [
    ("qadamw8", "qadamw8", {}),
    ("qadamw4", "qadamw4", {}),
    ("hybrid_adam", "hybrid_adam", {}),
    ("hybrid_lowrank", "hybrid_adam", {"m_codec": "lowrank", "rank": 4}),
    ("lion8", "lion8", {"lr": 3e-4}),
    ("sgd8", "sgd8", {"lr": 3e-2}),
    ("adafactor", "adafactor", {}),
    ("lowrank_adam", "lowrank_adam", {"rank": 4, "min_lowrank_numel": 1024}),
]
DDP_OPTIMIZERS = ["qadamw8", "qadamw4", "hybrid_adam", "lowrank_adam"]
DCP_OPTIMIZERS = ["qadamw4", "hybrid_lowrank"]  # quantized states; factored + low-rank states


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 37), torch.nn.GELU(), torch.nn.Linear(37, 8))  # fmt: skip


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 8, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, 64, generator=g)
        out.append((x, torch.tanh(x @ w)))
    return out


def optimizer(key: str, model):
    _, name, kw = next(o for o in OPTIMIZERS if o[0] == key)
    kw = {"lr": LR, **kw}
    return create_optimizer(name, model, **kw)


def train(model, opt, data, rank: int = 0, world: int = 1) -> list[float]:
    losses = []
    for x, y in data:
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    return losses


def full_params(model) -> list[torch.Tensor]:
    return [(p.full_tensor() if sharded.is_dtensor(p) else p).detach().clone() for p in model.parameters()]


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    diffs = [float((x - y).abs().max()) for x, y in zip(a, b)]
    differ = sum(int(((x - y).abs() > 1e-6).sum()) for x, y in zip(a, b))
    return {"max_abs": max(diffs), "per_param": diffs, "frac_differ": differ / sum(x.numel() for x in a)}


def fsdp(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def state_summary(model, opt) -> dict:
    """Per parameter: each state key -> [type, shape held by this rank]."""
    out = {}
    for n, p in model.named_parameters():
        st = opt.state.get(p, {})
        out[n] = {k: [type(v).__name__, list(sharded.local(v).shape)] for k, v in st.items() if isinstance(v, torch.Tensor)}
    return out


def scenario_ddp(rank, world, key, data):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = optimizer(key, model)
    losses = train(model, opt, data, rank, world)
    params = full_params(model.module)
    gathered = [torch.cat([p.reshape(-1) for p in params])]
    others = [torch.empty_like(gathered[0]) for _ in range(world)]
    dist.all_gather(others, gathered[0])
    ref = make_model()
    ref_losses = train(ref, optimizer(key, ref), data)
    return {"losses": losses, "ref_losses": ref_losses, "vs_ref": compare(params, full_params(ref)),
            "ranks_identical": all(bool(torch.equal(o, others[0])) for o in others)}  # fmt: skip


def scenario_fsdp(rank, world, mesh, key, data):
    model = fsdp(make_model(), mesh)
    opt = optimizer(key, model)
    losses = train(model, opt, data, rank, world)
    params = full_params(model)
    ref = make_model()
    ref_opt = optimizer(key, ref)
    ref_losses = train(ref, ref_opt, data)
    return {"losses": losses, "ref_losses": ref_losses, "vs_ref": compare(params, full_params(ref)),
            "states": state_summary(model, opt), "ref_states": state_summary(ref, ref_opt)}  # fmt: skip


def scenario_budget(rank, world, mesh, data):
    """A dynamic Budget on FSDP2: every rank plans the same, and the states of all ranks together fit the budget."""
    from efficient_optim.policy import Budget

    model = fsdp(make_model(), mesh)
    policy = Budget(bytes_per_param=2.0, allocator="dynamic", warmup=2, every=2, patience=1)
    opt = create_optimizer("qadamw", model, lr=LR, policy=policy)
    losses, totals = [], []
    for x, y in data:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        total = torch.tensor(float(state_bytes(opt)))
        dist.all_reduce(total)
        totals.append(float(total))
        losses.append(float(loss))
    plans = [None] * world
    mine = {f"{i}:{n}": policy.items[(i, n)].specs[c] for (i, n), c in policy.choice.items()}
    dist.all_gather_object(plans, mine)
    return {"losses": losses, "totals": totals, "limit": policy.limit, "plans_agree": all(p == plans[0] for p in plans),
            "measured": bool(policy.errors), "plan": mine}  # fmt: skip


def scenario_nonfinite(rank, world, mesh, data):
    """A NaN in rank 1's gradient shard only: every rank must skip the step (no rank steps alone)."""
    import warnings

    model = fsdp(make_model(), mesh)
    opt = optimizer("qadamw8", model)
    train(model, opt, data[:1], rank, world)
    before = full_params(model)
    x, y = data[1]
    opt.zero_grad()
    F.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    if rank == 1:
        next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    skipped = [None] * world
    dist.all_gather_object(skipped, opt.skipped_steps)
    return {"skipped": skipped, "unchanged": compare(full_params(model), before)["max_abs"] == 0.0}


def scenario_dcp(rank, world, mesh, key, data, ckpt):
    """Train 3 steps, save, train 3 more (A); a fresh model and optimizer load the checkpoint and train the
    same 3 steps (B): A and B must be bit-identical."""
    model = fsdp(make_model(), mesh)
    opt = optimizer(key, model)
    train(model, opt, data[:3], rank, world)
    save_checkpoint(ckpt, model, opt)
    after_save = full_params(model)
    losses_a = train(model, opt, data[3:], rank, world)
    a = full_params(model)
    model2 = fsdp(make_model(seed=123), mesh)
    opt2 = optimizer(key, model2)
    load_checkpoint(ckpt, model2, opt2)
    loaded = compare(full_params(model2), after_save)["max_abs"]
    losses_b = train(model2, opt2, data[3:], rank, world)
    return {"loaded_params_diff": loaded, "resume_diff": compare(full_params(model2), a)["max_abs"],
            "losses_a": losses_a, "losses_b": losses_b, "continued_params": [t.tolist() for t in a],
            "states": state_summary(model2, opt2)}  # fmt: skip


def scenario_other_world_size(key, data, ckpt, continued):
    """Load a 2-rank checkpoint into one process (no process group, plain model) and continue."""
    model = make_model(seed=123)
    opt = optimizer(key, model)
    try:
        load_checkpoint(ckpt, model, opt)
    except ValueError as exc:
        return {"loaded": False, "error": str(exc)}
    train(model, opt, data[3:])
    ref = [torch.tensor(t) for t in continued]
    return {"loaded": True, "continue_diff": compare(full_params(model), ref)["max_abs"]}


def raw_dcp_error(key, ckpt):
    """What plain DCP (no helper) says for the same mismatch."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = make_model(seed=123)
    opt = optimizer(key, model)
    msd, osd = get_state_dict(model, opt)
    try:
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        return f"{type(exc).__name__}: {exc}"
    return None


def main():
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    results, timings, t0 = {}, {}, time.time()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    data = batches()

    def run(name, fn, *args):
        t, c = time.time(), time.process_time()
        try:
            results[name] = fn(*args)
        except BaseException:  # recorded (DCP's CheckpointException included); the other scenarios still run
            results[name] = {"error": traceback.format_exc()}
        timings[name] = [round(time.time() - t, 2), round(time.process_time() - c, 2)]

    for key in DDP_OPTIMIZERS:
        run(f"ddp/{key}", scenario_ddp, rank, world, key, data)
    for key, _, _ in OPTIMIZERS:
        run(f"fsdp/{key}", scenario_fsdp, rank, world, mesh, key, data)
    run("fsdp/nonfinite", scenario_nonfinite, rank, world, mesh, data)
    run("fsdp/budget", scenario_budget, rank, world, mesh, data)
    for key in DCP_OPTIMIZERS:
        run(f"dcp/{key}", scenario_dcp, rank, world, mesh, key, data, os.path.join(out, f"ckpt_{key}"))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        for key in DCP_OPTIMIZERS:
            continued = results[f"dcp/{key}"].get("continued_params")
            if continued is not None:
                run(f"world1/{key}", scenario_other_world_size, key, data, os.path.join(out, f"ckpt_{key}"), continued)
        run("world1/raw_dcp_error", raw_dcp_error, "qadamw4", os.path.join(out, "ckpt_qadamw4"))
        timings["total"] = round(time.time() - t0, 2)
        with open(os.path.join(out, "results.json.tmp"), "w") as f:
            json.dump({"results": results, "timings": timings}, f)
        os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))


if __name__ == "__main__":
    main()
