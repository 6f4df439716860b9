"""One rank of the compressed-DDP scenarios that tests/test_compress_ddp.py checks (not collected by pytest).

    python tests/compress_dist_worker.py RANK WORLD_SIZE STORE_FILE OUT_DIR

Every scenario trains the same small MLP under DDP (small buckets, so there are several), each rank on its
half of every batch, through ``efficient_optim.compress.register_compression_hook`` or plain all-reduce.
Rank 0 writes ``OUT_DIR/results.json``.
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

from dist_worker import make_model  # noqa: E402  (the distributed tests' model: a 23.7k-parameter MLP)

from efficient_optim.compress import DGC, ErrorFeedback, NoFeedback, Quantize, register_compression_hook  # noqa: E402

STEPS, BATCH, LR = 6, 32, 0.05
BUCKET_MB = 0.02  # ~5k fp32 elements per bucket: the 23.7k-parameter model gets several


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 8, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, 64, generator=g)
        out.append((x, torch.tanh(x @ w)))
    return out


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1) for p in model.parameters()])


def same_on_all_ranks(t: torch.Tensor) -> bool:
    """Whether ``t`` is bit-identical on every rank."""
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, t) and torch.equal(hi, t))


def train(compressor, rank, world, data, opt_fn, lr_zero=False, nan_at=None):
    """Train STEPS steps; the final parameters, losses, per-step reduced gradients and the hook's state."""
    model = ddp(make_model())
    state = register_compression_hook(model, compressor) if compressor is not None else None
    opt = opt_fn(model.parameters())
    losses, grads = [], []
    for step, (x, y) in enumerate(data):
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        loss = F.mse_loss(model(xs), ys)
        if nan_at == step and rank == world - 1:
            loss = loss * float("nan")
        loss.backward()
        grads.append(flat_grads(model.module))
        if not lr_zero:
            opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, state, opt, losses, grads


def summary(model, state, losses, reference=None) -> dict:
    params = flat_params(model.module)
    out = {"losses": losses, "same_on_all_ranks": same_on_all_ranks(params)}
    if reference is not None:
        out["max_diff_to_plain"] = float((params - reference).abs().max())
    if state is not None:
        out["report"] = state.report()
        out["residual_keys"] = len(getattr(state.compressor, "residuals", {}) or getattr(state.compressor, "velocity", {}))
    return out


def residual_by_param(state, model) -> torch.Tensor:
    """This rank's residuals laid out like the flat parameters (a bucket key lists its parameters' positions)."""
    params = list(model.module.parameters())
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    out = torch.zeros(offsets[-1])
    for key in state.compressor.residuals:
        res, at = state.compressor.residual(key), 0
        for pos in key:
            n = params[pos].numel()
            out[offsets[pos]:offsets[pos] + n] = res[at:at + n]
            at += n
    return out


def scenario_plain_and_exact(rank, world, data, results):
    sgd = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    model, _, _, losses, _ = train(None, rank, world, data, sgd)
    reference = flat_params(model.module)
    results["plain"] = summary(model, None, losses)
    for name, comp in [("fp32", NoFeedback(Quantize(32))), ("q8_ef", ErrorFeedback(Quantize(8))),
                       ("q4_ef", ErrorFeedback(Quantize(4))), ("q2_ef", ErrorFeedback(Quantize(2)))]:  # fmt: skip
        m, state, _, losses, _ = train(comp, rank, world, data, sgd)
        results[name] = summary(m, state, losses, reference)
        results[name]["bucket_sizes"] = sorted(p.numel() for p in m.module.parameters())


def scenario_feedback_sum(rank, world, data, results):
    """lr = 0, one batch repeated: error feedback's sum of reduced gradients + the mean residual = the exact sum."""
    sgd = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    repeated = [data[0]] * STEPS
    _, _, _, _, exact = train(None, rank, world, repeated, sgd, lr_zero=True)
    exact_sum = torch.stack(exact).sum(0)
    out = {}
    for name, comp in [("ef", ErrorFeedback(Quantize(2), residual=Quantize(32))), ("no_ef", NoFeedback(Quantize(2)))]:
        model, state, _, _, grads = train(comp, rank, world, repeated, sgd, lr_zero=True)
        hook_sum = torch.stack(grads).sum(0)
        residual = residual_by_param(state, model) if name == "ef" else torch.zeros_like(hook_sum)
        dist.all_reduce(residual)
        out[name] = {"sum_error": float((hook_sum - exact_sum).norm() / exact_sum.norm()),
                     "sum_error_with_residual": float((hook_sum + residual / world - exact_sum).norm() / exact_sum.norm())}  # fmt: skip
    results["feedback_sum"] = out


def scenario_dgc(rank, world, data, results):
    comp = DGC(fraction=0.05, momentum=0.9, warmup_calls=4)
    model, state, _, losses, _ = train(comp, rank, world, data * 2, lambda ps: torch.optim.SGD(ps, lr=LR))
    results["dgc"] = summary(model, state, losses)
    results["dgc"]["state_nbytes"] = comp.state_nbytes()


def scenario_nonfinite(rank, world, data, results):
    """The last rank's loss is NaN at the last step: every rank's reduced gradient must be NaN (so any
    optimizer's non-finite policy sees it everywhere) and the finite rank's residuals are kept."""
    comp = ErrorFeedback(Quantize(8))
    sgd = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    model, state, _, losses, grads = train(comp, rank, world, data[:3], sgd, lr_zero=True, nan_at=2)
    all_nan = torch.tensor([float(bool(torch.isnan(grads[-1]).all()))])
    dist.all_reduce(all_nan, op=dist.ReduceOp.MIN)
    residuals = [comp.residual(k) for k in comp.residuals]
    results["nonfinite"] = {"grads_nan_on_every_rank": bool(all_nan.item() == 1.0),
                            "earlier_grads_finite": all(bool(torch.isfinite(g).all()) for g in grads[:-1]),
                            "rank0_residuals_finite": all(bool(torch.isfinite(r).all()) for r in residuals),
                            "rank0_residual_keys": len(residuals)}  # fmt: skip


def main():
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results, timings, data = {}, {}, batches()
    for fn in (scenario_plain_and_exact, scenario_feedback_sum, scenario_dgc, scenario_nonfinite):
        t = time.time()
        try:
            fn(rank, world, data, results)
        except BaseException:  # recorded; the other scenarios still run
            results[fn.__name__] = {"error": traceback.format_exc()}
        timings[fn.__name__] = round(time.time() - t, 2)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(out, "results.json.tmp"), "w") as f:
            json.dump({"results": results, "timings": timings}, f)
        os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))


if __name__ == "__main__":
    main()
