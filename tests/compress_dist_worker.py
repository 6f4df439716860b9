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

from dist_worker import batches, make_model  # noqa: E402  (the distributed tests' MLP (23.7k parameters) and data)

from efficient_optim.compress import (  # noqa: E402
    DGC,
    AccordionController,
    ErrorFeedback,
    LayerChoice,
    NoFeedback,
    Quantize,
    StaticController,
    register_compression_hook,
)

STEPS, LR = 6, 0.05  # six batches of dist_worker.batches()
BUCKET_MB = 0.02  # ~5k fp32 elements per bucket: the 23.7k-parameter model gets several


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


def train_controlled(make_ctl, compressor, rank, world, data):
    """Train under the hook with the controller ``make_ctl(params)``; also whether the controller observed,
    at every step, each layer's reduced gradient (the one the optimizer steps with)."""
    model = ddp(make_model())
    params = list(model.module.parameters())
    ctl = make_ctl(params)
    state = register_compression_hook(model, compressor, controller=ctl)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, observed = [], True
    for step, (x, y) in enumerate(data):
        half = x.shape[0] // world
        loss = F.mse_loss(model(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half])
        loss.backward()
        observed &= all(len(ctl.norms[k]) == min(step + 1, ctl.window) and
                        abs(ctl.norms[k][-1] - float(p.grad.norm())) <= 1e-6 * float(p.grad.norm()) for k, p in enumerate(params))  # fmt: skip
        opt.step()
        opt.zero_grad()
        ctl.step(step, total_steps=len(data))
        losses.append(loss.item())
    return model, state, ctl, losses, observed


def predicted_payload(record, params, bits_of) -> tuple[int, list]:
    """The payload bytes of an iteration whose bucket of layers ``key`` is sent at ``bits_of(key)`` bits (the
    4-byte flag + ``Quantize(bits).nbytes``), and those bits' names."""
    total, names = 0, []
    for key, _ in record["buckets"]:
        bits = bits_of(key)
        total += 4 + Quantize(bits).nbytes(sum(params[k].numel() for k in key))
        names.append(Quantize(bits).describe())
    return total, names


def scenario_controller(rank, world, data, results):
    """A controller drives the hook: fp32 equals plain all-reduce; Accordion's rule switches every layer from
    8 to 4 bits after its warm-up; a static per-layer choice gives each bucket its most precise layer's bits."""
    sgd = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    plain, _, _, plain_losses, _ = train(None, rank, world, data, sgd)
    reference = flat_params(plain.module)
    fp32 = lambda ps: StaticController(ps, LayerChoice("fp32"), every=1)  # noqa: E731
    model, state, _, losses, observed = train_controlled(fp32, ErrorFeedback(Quantize(2)), rank, world, data)
    out = {"fp32": {**summary(model, state, losses, reference), "observed": observed,
                    "equal_losses": losses == plain_losses}}  # fmt: skip
    rules = lambda ps: AccordionController(ps, low=LayerChoice("q4"), high=LayerChoice("q8"), threshold=1e9,  # noqa: E731
                                           warmup_steps=3, every=3, window=3)  # fmt: skip
    model, state, ctl, losses, observed = train_controlled(rules, ErrorFeedback(Quantize(2)), rank, world, data)
    params = list(model.module.parameters())
    # decisions at steps 0 (warm-up: q8) and 3 (q4) take effect at the next iterations; iteration 0 is plain
    bits = {1: 8, 2: 8, 3: 8, 4: 4, 5: 4}
    iters = state.report()["per_iteration"]
    out["rules"] = {**summary(model, state, losses, reference), "observed": observed,
                    "history": [h["choices"] for h in ctl.history], "resets": state.compressor.resets,
                    "measured": [r["payload_bytes"] for r in iters[1:]],
                    "predicted": [predicted_payload(r, params, lambda key, i=i: bits[i])[0] for i, r in enumerate(iters) if i],
                    "names": [[n for _, n in r["buckets"]] for r in iters[1:]],
                    "predicted_names": [predicted_payload(r, params, lambda key, i=i: bits[i])[1] for i, r in enumerate(iters) if i],
                    "plain_first": iters[0]["payload_bytes"] == 0 and iters[0]["plain_bytes"] == 4 * len(reference)}  # fmt: skip
    layer_bits = {k: 2 for k in range(8)} | {1: 8, 5: 4}
    static = lambda ps: StaticController(ps, {k: LayerChoice(f"q{b}") for k, b in layer_bits.items()}, every=100)  # noqa: E731
    model, state, _, losses, observed = train_controlled(static, ErrorFeedback(Quantize(32)), rank, world, data)
    params, iters = list(model.module.parameters()), state.report()["per_iteration"]
    most_precise = lambda key: max(layer_bits[k] for k in key)  # noqa: E731
    out["static"] = {**summary(model, state, losses, reference), "observed": observed,
                     "measured": [r["payload_bytes"] for r in iters[1:]],
                     "predicted": [predicted_payload(r, params, most_precise)[0] for r in iters[1:]],
                     "names": [[n for _, n in r["buckets"]] for r in iters[1:]],
                     "predicted_names": [predicted_payload(r, params, most_precise)[1] for r in iters[1:]],
                     "keys": [k for k, _ in iters[-1]["buckets"]]}  # fmt: skip
    results["controller"] = out


def main():
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results, timings, data = {}, {}, batches()
    for fn in (scenario_plain_and_exact, scenario_feedback_sum, scenario_dgc, scenario_nonfinite, scenario_controller):
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
