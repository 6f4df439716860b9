"""Optimizer-step time over ~85M parameters in GPT-2-small shapes, ours vs the anchors, in one run.

    python benchmarks/step_speed.py                      # all installed optimizers
    python benchmarks/step_speed.py --only adamw_fused,qadamw8,qadamw4 --repeats 10

Prints per optimizer: median step time, ratio to torch fused fp32 AdamW, and the bandwidth floor of its
bytes moved per step (fp32 Adam: p,g,m,v read + p,m,v written = 28 B/param; 8-bit states: 16; 4-bit: 14)
from the copy bandwidth measured in this run. Warm-up (the first steps: kernel load, torch.compile) is
timed and reported separately. Writes a JSON with the same numbers if ``--json`` is given.

On a GPU (``--device cuda``) the parameters are those of real models (``--sizes``: GPT-2 124M, Llama 1B and
7B, and ResNet-101's 314 mostly small tensors) and each optimizer's median step is also given as the fraction
of the copy bandwidth measured on the same GPU in the same run (its bytes moved per step / step time / copy
bandwidth). Anchors not installed are skipped with the reason. Without a CUDA device it says so and exits 2.

    python benchmarks/step_speed.py --device cuda                      # every size, every installed optimizer
    python benchmarks/step_speed.py --device cuda --sizes 124m,resnet101 --only adamw_fused,qadamw8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_gbs, gpt2_like_names, gpt2_like_shapes, make_params, median_ms, time_steps  # noqa: E402
from model_shapes import SIZES  # noqa: E402

import efficient_optim as eo  # noqa: E402

# name -> (factory, bytes moved per parameter per step, for the floor)
CANDIDATES = {
    "adamw_fused": (lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), 28),
    "adamw_foreach": (lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True), 28),
    "qadamw8": (lambda p: eo.QAdamW(p, lr=1e-3, bits=8), 16),
    "qadamw4": (lambda p: eo.QAdamW(p, lr=1e-3, bits=4), 14),
    # the closed-form maps: the CPU kernel computes their levels instead of reading tables (docs/kernels.md)
    "qadamw8_sqrt": (lambda p: eo.QAdamW(p, lr=1e-3, bits=8, m_map="sqrt", v_map="sqrt_nozero"), 16),
    "qadamw8_reference": (lambda p: eo.QAdamW(p, lr=1e-3, bits=8, fused=False), 16),
    "bnb_adamw8bit": (lambda p: eo.create_optimizer("adamw_bnb_8bit", p, lr=1e-3), 16),
    "torchao_adamw8bit": (lambda p: eo.create_optimizer("adamw_torchao_8bit", p, lr=1e-3), 16),
    "torchao_adamw4bit": (lambda p: eo.create_optimizer("adamw_torchao_4bit", p, lr=1e-3), 14),
    "hybrid_adam": (lambda p: eo.create_optimizer("hybrid_adam", p, lr=1e-3), 13),
    "hybrid_adam_m8": (lambda p: eo.create_optimizer("hybrid_adam", p, lr=1e-3, m_codec="8bit"), 14),
    "hybrid_adam_lowrank_m": (lambda p: eo.create_optimizer("hybrid_adam", p, lr=1e-3, m_codec="lowrank"), 12),
    "lowrank_adam": (lambda p: eo.create_optimizer("lowrank_adam", p, lr=1e-3), 12),
    "lowrank_adam_online": (lambda p: eo.create_optimizer("lowrank_adam", p, lr=1e-3, update_strategy="online"), 12),
    "lowrank_adam_periodic": (lambda p: eo.create_optimizer("lowrank_adam", p, lr=1e-3, rank=128, update_strategy="periodic"), 12),
    "adafactor": (lambda p: eo.create_optimizer("adafactor", p, lr=1e-3), 12),
    "adafactor_hf": (lambda p: eo.create_optimizer("adafactor_hf", p, lr=1e-3), 12),
    "lion": (lambda p: eo.create_optimizer("lion", p, lr=1e-4), 20),
    "lion8": (lambda p: eo.create_optimizer("lion8", p, lr=1e-4), 14),
    "lion_bnb_8bit": (lambda p: eo.create_optimizer("lion_bnb_8bit", p, lr=1e-4), 14),
    "sgd_fp32": (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=True), 20),
    "sgd8": (lambda p: eo.create_optimizer("sgd8", p, lr=1e-2), 14),
    "galore_adamw": (lambda p: eo.create_optimizer("galore_adamw", p, lr=1e-3), 12),
    "apollo_adamw": (lambda p: eo.create_optimizer("apollo_adamw", p, lr=1e-3), 12),
    "came": (lambda p: eo.create_optimizer("came", p, lr=1e-3), 12),
    # Adam-mini groups parameters by name: given GPT-2 names in the benchmark's order
    "adam_mini": (lambda p: eo.create_optimizer("adam_mini", list(zip(gpt2_like_names(len(p) // 12), p)), lr=1e-3,
                                                dim=int(p[1].shape[0]), n_heads=12), 20),
}
CANDIDATES["flash_adamw"] = (lambda p: eo.create_optimizer("flash_adamw", p, lr=1e-3), 16)
DEFAULT = "adamw_fused,adamw_foreach,qadamw8,qadamw4,bnb_adamw8bit,torchao_adamw8bit,torchao_adamw4bit"
CUDA_DEFAULT = DEFAULT + ",hybrid_adam,adafactor,flash_adamw"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to step (default cpu)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {list(CANDIDATES)} (default: "
                    f"{DEFAULT} on the CPU; on CUDA also hybrid_adam,adafactor,flash_adamw)")  # fmt: skip
    ap.add_argument("--layers", type=int, default=12, help="CPU: GPT-2-like layers of width 768 (12 -> ~85M params)")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"CUDA: comma-separated models of {list(SIZES)} "
                    "(default all)")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (reported separately)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    ap.add_argument("--anchor-repeats", type=int, default=3, help="timed steps for the slow anchors (bnb, torchao)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    names = (args.only or (CUDA_DEFAULT if args.device == "cuda" else DEFAULT)).split(",")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        ap.error(f"unknown optimizer(s) {unknown}; choose from {list(CANDIDATES)}")
    if args.device == "cuda":
        return run_cuda(args, names)
    return run_cpu(args, names)


def run_cpu(args, names: list[str]) -> int:
    """The CPU benchmark on the GPT-2-like stack of ``args.layers`` layers (the script's original run)."""
    shapes = gpt2_like_shapes(args.layers)
    n = sum(torch.Size(s).numel() for s in shapes)
    bw = copy_bandwidth_gbs()
    print(f"{n / 1e6:.1f}M parameters in {len(shapes)} tensors; threads={torch.get_num_threads()}; "
          f"copy bandwidth {bw:.1f} GB/s (read+write)")  # fmt: skip
    results = {}
    for name in names:
        factory, moved = CANDIDATES[name]
        try:
            params = make_params(shapes)
            opt = factory(params)
        except (ImportError, ValueError) as exc:
            print(f"{name:20s} skipped: {exc}")
            continue
        slow = ("bnb", "torchao", "galore", "apollo", "came", "adafactor", "lion", "sgd", "hybrid", "adam_mini", "lowrank")
        repeats = args.anchor_repeats if name.startswith(slow) or "reference" in name else args.repeats
        warm, times = time_steps(opt.step, args.warmup, repeats)
        floor_ms = moved * n / (bw * 1e9) * 1e3
        results[name] = {"median_ms": median_ms(times), "warmup_s": warm, "floor_ms": floor_ms,
                         "bytes_per_param_moved": moved, "state_bytes": eo.state_bytes(opt)}  # fmt: skip
        print(f"{name:20s} {median_ms(times):9.1f} ms   warm-up {warm:6.1f} s   floor {floor_ms:6.1f} ms", flush=True)
        del opt, params
    base = results.get("adamw_fused", {}).get("median_ms")
    print("\nname                  step ms   x fused fp32 AdamW   x own floor")
    for name, r in results.items():
        ratio = f"{r['median_ms'] / base:8.2f}x" if base else "     n/a"
        print(f"{name:20s} {r['median_ms']:9.1f}   {ratio:>18s}   {r['median_ms'] / r['floor_ms']:8.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"num_params": n, "copy_gbs": bw, "results": results}, indent=2))
    return 0


def cuda_copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """The GPU's streaming bandwidth (bytes read + written per second, GB/s): the best of a device-to-device
    copy and an in-place ``mul_(1)`` over ``nbytes``, timed with CUDA events."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for op in (lambda: dst.copy_(src), lambda: src.mul_(1.0)):
        op()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            op()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * nbytes / best / 1e9


def cuda_time_steps(step, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """``time_steps`` on the GPU: each step timed from a synchronized start to its synchronized end (launch
    overhead included, as a training loop pays it)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return warm, times


def _cuda_params(shapes) -> list[torch.nn.Parameter]:
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02)
        p.grad = torch.randn(s, device="cuda") * 1e-3
        params.append(p)
    return params


def _triton_path() -> str:
    """Which path our optimizers take on CUDA parameters."""
    try:
        from efficient_optim.kernels.triton_adamw import triton_kernels
    except ImportError as exc:
        return f"PyTorch reference path (Triton kernels unavailable: {exc})"
    return "Triton kernels" if triton_kernels() is not None else "PyTorch reference path (no Triton device)"


def _cuda_size(size: str, names: list[str], args, bw: float) -> dict:
    """Time every optimizer of ``names`` on the parameters of model ``size``; prints one line each."""
    shapes = SIZES[size]()
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"\n== {size}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors", flush=True)
    params, results = _cuda_params(shapes), {}
    for name in names:
        factory, moved = CANDIDATES[name]
        try:
            opt = factory(params)
            warm, times = cuda_time_steps(opt.step, args.warmup, args.repeats)
        except (ImportError, ValueError, RuntimeError) as exc:  # not installed, CPU-only, out of memory
            print(f"{name:20s} skipped: {str(exc).splitlines()[0][:160]}", flush=True)
            opt = None
            torch.cuda.empty_cache()
            continue
        ms = median_ms(times)
        gbs = moved * n / (ms / 1e3) / 1e9
        results[name] = {"median_ms": ms, "warmup_s": warm, "bytes_per_param_moved": moved, "achieved_gbs": gbs,
                         "fraction_of_copy_bandwidth": gbs / bw}  # fmt: skip
        print(f"{name:20s} {ms:9.2f} ms   {gbs:7.0f} GB/s = {100 * gbs / bw:5.1f} % of copy   warm-up {warm:5.1f} s",
              flush=True)  # fmt: skip
        del opt
        torch.cuda.empty_cache()
    del params
    torch.cuda.empty_cache()
    base, foreach = (results.get(k, {}).get("median_ms") for k in ("adamw_fused", "adamw_foreach"))
    print(f"{'name':20s} {'step ms':>9s}  {'x fused AdamW':>13s}  {'x foreach AdamW':>15s}  {'% copy bw':>9s}")
    for name, r in results.items():
        ratios = [f"{r['median_ms'] / b:12.2f}x" if b else f"{'n/a':>13s}" for b in (base, foreach)]
        print(f"{name:20s} {r['median_ms']:9.2f}  {ratios[0]}  {ratios[1]:>15s}  "
              f"{100 * r['fraction_of_copy_bandwidth']:8.1f}%")  # fmt: skip
    return {"num_params": n, "num_tensors": len(shapes), "results": results}


def run_cuda(args, names: list[str]) -> int:
    """The GPU benchmark over ``args.sizes``; exits 2 (nothing measured) without a CUDA device."""
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        print(f"step_speed.py: unknown size(s) {unknown}; choose from {list(SIZES)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("step_speed.py --device cuda: no CUDA device here (torch.cuda.is_available() is False); "
              "nothing was measured", file=sys.stderr)  # fmt: skip
        return 2
    bw = cuda_copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw:.0f} GB/s (read+write); ours run on: {_triton_path()}")
    out = {"device": torch.cuda.get_device_name(), "copy_gbs": bw,
           "sizes": {size: _cuda_size(size, names, args, bw) for size in sizes}}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
