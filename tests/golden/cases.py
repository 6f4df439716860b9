"""The golden-trajectory setup shared by ``record.py`` (writes the fixtures) and ``tests/test_golden.py``.

A case is one optimizer built by ``efficient_optim.create_optimizer(registry_name, model, lr=1e-3, **kwargs)``
on a small fixed model and stepped with fixed, seeded gradients. The model's shapes make every codec path
run: a matrix and a 3-D tensor of >= 4096 elements (quantized, factored, low-rank states; block counts with
a partial last block), small tensors that stay dense (a 16 x 16 matrix, a bias, a LayerNorm, a 0-d scalar),
and an embedding whose "unused" rows get zero gradients (dead units: zero-free maps matter there).

Gradients do not come from a backward pass (BLAS results can depend on the CPU and the thread count):
``g = scale * randn(seeded by step and parameter) + 0.1 * p``, in float32, cast to the parameter's dtype,
so the trajectory is closed-loop (it depends on the parameters) and reproducible everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

import efficient_optim as eo
from efficient_optim.kernels.cpu import kernels_disabled, load_cpu_kernels

STEPS = 5  # steps recorded per case
CHECKPOINT_STEP = 3  # a checkpoint is taken after this step; the test resumes from it
LR = 1e-3
DIGEST_CHARS = 32  # hex characters kept of each sha256 (128 bits)

# name -> (shape, gradient scale); order is the parameter order every optimizer sees
SHAPES = {
    "wte": ((64, 64), 1.0),  # exactly 4096 elements: the smallest tensor that is compressed
    "h0.attn.bias": ((104,), 0.5),
    "h0.ln.weight": ((64,), 0.1),
    "h0.ln.bias": ((64,), 0.1),
    "h0.conv.weight": ((3, 37, 40), 10.0),  # 3-D (a 111 x 40 matrix), 4440: partial last blocks; large gradients
    "h0.small.weight": ((16, 16), 1e-4),  # stays dense, tiny gradients
    "logit_scale": ((), 1.0),  # 0-d
}
DEAD_ROWS = 3  # every DEAD_ROWS-th row of wte gets a zero gradient at every step


@dataclass(frozen=True)
class Case:
    """One recorded optimizer: ``create_optimizer(registry, model, lr=LR, **kwargs)`` on a ``dtype`` model.

    ``kwargs`` may hold ``lr`` (``None`` drops it: the optimizer's own default applies).
    ``checkpoint``: whether a step-3 checkpoint is recorded (our optimizers; torch's are controls only);
    ``save_params``: whether it also holds the step-3 parameters (registry defaults; variants regenerate
    them and check them against the recorded digests, which keeps the fixtures under 2 MB).
    """

    id: str
    registry: str
    kwargs: dict = field(default_factory=dict)
    dtype: str = "float32"
    checkpoint: bool = True
    save_params: bool = False

    @property
    def torch_own(self) -> bool:
        """Whether this case is one of torch's optimizers (a control: not part of the refactor)."""
        return self.registry in TORCH_CONTROLS


TORCH_CONTROLS = ("adamw", "adam", "sgd")
PARTIAL = ("qadamw_partial",)  # ours, registered by bench.characterize without a target; needs select= (variants)
# registry entries that are adapters of other packages: never recorded (not ours; not all deterministic)
EXTERNAL = ("adafactor_hf", "adam_mini", "adamw_bnb_8bit", "adamw_torchao_4bit", "adamw_torchao_8bit", "apollo_adamw",
            "came", "flash_adamw", "galore_adamw", "lion_bnb_8bit")  # fmt: skip
# non-default settings of our optimizers whose code paths the refactor moves (codec choices, strategies)
VARIANTS = [
    Case("qadamw[bits=32]", "qadamw", {"bits": 32}),
    Case("qadamw[bits=16]", "qadamw", {"bits": 16}),
    Case("qadamw4[m_rounding=nearest,v_map=linear]", "qadamw4", {"m_rounding": "nearest", "v_map": "linear"}),
    Case("qadamw4[m_correct_every=1,v_correct_every=2]", "qadamw4", {"m_correct_every": 1, "v_correct_every": 2}),
    Case("qadamw4[m_map=learned,map_refit_every=2]", "qadamw4", {"m_map": "learned", "map_refit_every": 2}),
    Case("qadamw8[bf16 weights,correction_bits=8]", "qadamw8", {"correction_bits": 8}, dtype="bfloat16"),
    Case("qadamw8[min_quantize_numel=0,scale_dtype=float32]", "qadamw8",
         {"min_quantize_numel": 0, "scale_dtype": "float32"}),  # fmt: skip
    Case("hybrid_adam[m=lowrank]", "hybrid_adam", {"m_codec": "lowrank"}),
    Case("hybrid_adam[m=8bit,v=8bit]", "hybrid_adam", {"m_codec": "8bit", "v_codec": "8bit"}),
    Case("hybrid_adam[m=bf16,v=lowrank,rank=4]", "hybrid_adam", {"m_codec": "bf16", "v_codec": "lowrank", "rank": 4}),
    Case("hybrid_adam[m=fp32,v=factored]", "hybrid_adam", {"m_codec": "fp32"}),
    Case("lowrank_adam[online]", "lowrank_adam", {"update_strategy": "online"}),
    Case("lowrank_adam[randomized,svd_freq=2,v=lowrank]", "lowrank_adam",
         {"svd_freq": 2, "v_storage": "lowrank"}),  # fmt: skip
    Case("lowrank_adam[periodic,svd_freq=2]", "lowrank_adam", {"update_strategy": "periodic", "svd_freq": 2}),
    Case("lowrank_adam[factor_ema,v=dense]", "lowrank_adam", {"update_strategy": "factor_ema", "v_storage": "dense"}),
    Case("adafactor[beta1=0.9,m_bits=8]", "adafactor", {"beta1": 0.9, "m_bits": 8}),
    Case("adafactor[relative_step]", "adafactor", {"lr": None}),
    Case("lion8[stochastic,bf16 weights]", "lion8", {"rounding": "stochastic"}, dtype="bfloat16"),
    Case("sgd8[nesterov,weight_decay=0.01]", "sgd8", {"nesterov": True, "weight_decay": 0.01}),
    Case("qadamw_partial[select=0.5]", "qadamw_partial", {"select": "0.5"}),
    Case("qadamw_partial[naive,select=1]", "qadamw_partial", {"select": "1", "preset": "naive"}),
]


def ensure_registered() -> None:
    """Import the modules that register optimizers as a side effect (``qadamw_partial``)."""
    import efficient_optim.bench.characterize  # noqa: F401


def all_cases() -> list[Case]:
    """Every registry optimizer at its defaults (ours and torch's controls), then the variants."""
    ensure_registered()
    names = [n for n in eo.list_optimizers() if n not in EXTERNAL]
    unknown = [n for n in names if not eo.registry.optimizer_entry(n).ours and n not in (*TORCH_CONTROLS, *PARTIAL)]
    if unknown:
        raise RuntimeError(f"registry entries neither ours nor known controls/adapters: {unknown}")
    defaults = [Case(n, n, checkpoint=n not in TORCH_CONTROLS, save_params=True) for n in names if n not in PARTIAL]
    return defaults + VARIANTS


def kernel_state() -> dict:
    """Which step path runs here: the fused CPU kernel (loaded) or the PyTorch reference."""
    return {"fused_kernel": load_cpu_kernels() is not None, "kernels_disabled": kernels_disabled()}


def environment() -> dict:
    """What a recording depends on besides the code: torch, the CPU's vector ISA, the step path."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), **kernel_state()}


def make_params(dtype: str) -> list[torch.nn.Parameter]:
    """The fixed model's parameters (seed 0), in ``SHAPES`` order."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape, _ in SHAPES.values():
        x = torch.randn(shape, generator=gen) * 0.02
        params.append(torch.nn.Parameter(x.to(getattr(torch, dtype))))
    return params


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    """Seeded gradients for ``step`` (1-based): noise scaled per tensor plus ``0.1 * p``; dead wte rows."""
    for i, (p, (_, scale)) in enumerate(zip(params, SHAPES.values())):
        gen = torch.Generator().manual_seed(1000 * step + i)
        g = scale * torch.randn(p.shape, generator=gen) + 0.1 * p.detach().float()
        if i == 0:
            g[::DEAD_ROWS] = 0.0
        p.grad = g.to(p.dtype)


def build(case: Case, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The case's optimizer over ``params`` (a plain list, in ``SHAPES`` order)."""
    kwargs = {"lr": LR, **case.kwargs}
    if kwargs["lr"] is None:
        del kwargs["lr"]
    return eo.create_optimizer(case.registry, params, **kwargs)


def run_steps(opt: torch.optim.Optimizer, params: list, first: int, last: int, on_step=None) -> None:
    """Steps ``first..last`` (1-based, inclusive); ``on_step(step)`` after each."""
    for step in range(first, last + 1):
        set_grads(params, step)
        opt.step()
        if on_step is not None:
            on_step(step)


def digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (first ``DIGEST_CHARS`` hex characters)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


def param_digests(params: list[torch.Tensor]) -> list[str]:
    """One digest per parameter."""
    return [digest(p) for p in params]


def state_digests(state_dict: dict) -> dict[str, str]:
    """``"<param index>.<key>" -> digest`` (tensors) or ``repr`` (numbers) for the state part of a state_dict."""
    out = {}
    for index in sorted(state_dict["state"]):
        for key, value in sorted(state_dict["state"][index].items()):
            out[f"{index}.{key}"] = digest(value) if torch.is_tensor(value) else repr(value)
    return out


def group_settings(state_dict: dict) -> dict[str, str]:
    """``"<group index>.<key>" -> repr(value)`` of the param groups' settings (not their ``params``)."""
    return {f"{i}.{k}": repr(v) for i, g in enumerate(state_dict["param_groups"]) for k, v in sorted(g.items())
            if k != "params"}  # fmt: skip


def trajectory(case: Case, keep_checkpoint: bool = True) -> dict:
    """Run ``STEPS`` steps of ``case`` from the fixed start; digests per step, the final state, a checkpoint.

    Returns ``{"params": [[digest per parameter] per step], "state": ..., "groups": ...,
    "checkpoint": {"params": [...], "optimizer": state_dict} at CHECKPOINT_STEP}`` (``{}`` without
    ``keep_checkpoint`` or ``case.checkpoint``; no ``"params"`` without ``case.save_params``).
    """
    torch.manual_seed(0)
    params = make_params(case.dtype)
    opt = build(case, params)
    steps, checkpoint = [], {}

    def on_step(step: int) -> None:
        steps.append(param_digests(params))
        if step == CHECKPOINT_STEP and keep_checkpoint and case.checkpoint:
            if case.save_params:
                checkpoint["params"] = [p.detach().clone() for p in params]
            checkpoint["optimizer"] = _cloned(opt.state_dict())

    run_steps(opt, params, 1, STEPS, on_step)
    final = opt.state_dict()
    return {"params": steps, "state": state_digests(final), "groups": group_settings(final), "checkpoint": checkpoint}


def _cloned(obj):
    """A deep copy of a state_dict with every tensor cloned (state_dict() shares the live state tensors)."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cloned(v) for v in obj)
    return obj


def resume(case: Case, checkpoint: dict, step_digests: list[str]) -> list[str]:
    """Load a step-``CHECKPOINT_STEP`` checkpoint into a fresh optimizer, run to ``STEPS``; final digests.

    The parameters come from the checkpoint when it holds them; otherwise (the variants, to keep the
    fixtures small) from ``CHECKPOINT_STEP`` steps of a throw-away optimizer, checked against
    ``step_digests`` (the recorded parameters after that step), so they are the recorded ones.
    """
    torch.manual_seed(0)
    params = make_params(case.dtype)
    if "params" in checkpoint:
        with torch.no_grad():
            for p, saved in zip(params, checkpoint["params"], strict=True):
                p.copy_(saved)
    else:
        run_steps(build(case, params), params, 1, CHECKPOINT_STEP)
    if param_digests(params) != step_digests:
        raise AssertionError(f"{case.id}: the parameters at step {CHECKPOINT_STEP} are not the recorded ones")
    opt = build(case, params)
    opt.load_state_dict(checkpoint["optimizer"])
    run_steps(opt, params, CHECKPOINT_STEP + 1, STEPS)
    return param_digests(params)


def file_name(case_id: str) -> str:
    """A file name for a case id (brackets, commas, '=' and spaces replaced)."""
    keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in case_id)
    return keep.strip("_") + ".pt"
