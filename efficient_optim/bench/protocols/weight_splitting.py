"""Weight splitting with compressed momentum (protocol P8): split bf16 weights + error-correction bits, with fp32 / 8-bit / 4-bit momentum, vs fp32 AdamW.

Configurations (docs/protocols.md, P8), on the tiny GPT-2 LM and on the digits CNN:

- **A**: bf16 weights + 16 correction bits, fp32 moments (``qadamw+bits=32+correction_bits=16``)
- **B**: the same with 8-bit moments; **C**: with 4-bit moments
- **E** (LM): 4-bit moments and stochastically rounded bf16 weights, no correction bytes (the smallest)
- **D**: plain fp32 AdamW (fp32 weights)
- low-rank momentum (``lowrank_adam+update_strategy=online``) with bf16 weights, when it is available

and, on the LM with one seed, how B keeps its weights: 8 correction bits, Kahan, stochastic rounding,
plain round-to-nearest, and B with gradient release (no clipping).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import RunConfig
from ..report import Group, group_runs
from ..runner import plan_matrix
from .base import MET, NOT_MEASURABLE, NOT_MET, Protocol, Verdict, available, why_missing

A = "qadamw+bits=32+correction_bits=16"
B = "qadamw+bits=8+correction_bits=16"
C = "qadamw+bits=4+correction_bits=16"
D = "adamw"
E = "qadamw+bits=4+weight_rounding=stochastic"  # the smallest: no correction bytes at all
LOWRANK = "lowrank_adam+update_strategy=online+correction_bits=16"
B_VARIANTS = ("qadamw+bits=8+correction_bits=8", "qadamw+bits=8+weight_rounding=kahan",
              "qadamw+bits=8+weight_rounding=stochastic", "qadamw+bits=8+weight_rounding=nearest")  # fmt: skip
# the release run: E (the smallest configuration), stepped during backward
CNN = {"model": "digits-cnn", "batch_size": 64, "context": None, "layers": None, "width": None, "heads": None}


class WeightSplitting(Protocol):
    """bf16 weights + correction bits with fp32 / 8-bit / 4-bit momentum against fp32 AdamW, on an LM and a CNN."""

    name = "weight-splitting"
    aliases = ("p8",)
    protocol_id = "P8"
    title = "Weight splitting + compressed momentum (P8)"
    # bf16 matrix products are several times slower than fp32 on CPUs without bf16 instructions: 200 steps
    defaults = RunConfig(steps=200, context=64, batch_size=16, lr=3e-3, eval_every=50)
    quick_steps = 40

    def plan(self, base, seeds, quick):
        missing = []
        bf16 = {"param_dtype": "bfloat16"}
        specs = [A, B, C, E]
        if available("lowrank_adam"):
            specs.append(LOWRANK)
        else:
            missing.append(Verdict("low-rank momentum", "lowrank_adam", "n/a", NOT_MEASURABLE, why_missing("lowrank_adam")))
        plan = []
        for label, model in (("lm", {}), ("cnn", CNN)):
            b = dataclasses.replace(base, **model)
            plan += plan_matrix(b, [D], seeds, {label: {}})
            plan += plan_matrix(b, specs if label == "lm" else [A, B, C], seeds, {label: bf16})
        plan += plan_matrix(base, list(B_VARIANTS[:2] if quick else B_VARIANTS), 1, {"lm": bf16})
        plan += plan_matrix(base, [E], 1, {"lm-release": {**bf16, "grad_release": True, "clip": 0.0}})
        return plan, missing

    def verdicts(self, runs, out: Path, base: RunConfig):
        groups = group_runs(runs)
        find = lambda spec, label: next((g for g in groups if g.optimizer == spec and g.settings == label), None)  # noqa: E731
        v = []
        for label in ("lm", "cnn"):
            a, b, c, d = (find(s, label) for s in (A, B, C, D))
            if not all(g and g.ok for g in (a, b, d)):
                v.append(Verdict("all criteria", label, "n/a", NOT_MEASURABLE, "A, B or D has no finished run"))
                continue
            mem = 1 - b.stat("peak_memory_bytes")[0] / a.stat("peak_memory_bytes")[0]
            v.append(Verdict("peak memory -20% for B vs A (params + grads + states + corrections)", label,
                             f"{mem * 100:.1f}% less", MET if mem >= 0.2 else NOT_MET))  # fmt: skip
            thr = b.stat("tokens_per_s")[0] / a.stat("tokens_per_s")[0] - 1
            v.append(Verdict("throughput -<= 10% for B vs A", label, f"{thr * 100:+.1f}%", MET if thr >= -0.1 else NOT_MET))
            e = find(E, label)
            for name, g in (("A", a), ("B", b), ("C", c), ("E: 4-bit, stochastic weights", e)):
                if g is None:
                    continue
                if g.ok:
                    dppl = g.stat("val_ppl")[0] - d.stat("val_ppl")[0]
                    v.append(Verdict(f"perplexity +<= 1.0 vs D ({name})", label, f"{dppl:+.3f} ppl",
                                     MET if dppl <= 1.0 else NOT_MET))  # fmt: skip
                    gap = g.stat("final_val_loss")[0] / d.stat("final_val_loss")[0] - 1
                    v.append(Verdict(f"issue target: val loss within 1% of fp32 AdamW ({name})", label,
                                     f"{gap * 100:+.2f}%", MET if gap <= 0.01 else NOT_MET))  # fmt: skip
                bad = len(g.rows) - len(g.ok)
                v.append(Verdict(f"no divergence in 3 seeds ({name})", label, f"{bad}/{len(g.rows)} diverged",
                                 MET if bad == 0 and len(g.rows) >= 3 else NOT_MET,
                                 "" if len(g.rows) >= 3 else f"only {len(g.rows)} seed(s)"))  # fmt: skip
        v += self._weight_modes(groups)
        return v

    @staticmethod
    def _weight_modes(groups: list[Group]) -> list[Verdict]:
        rows = []
        for spec in (B, *B_VARIANTS):
            g = next((g for g in groups if g.optimizer == spec and g.settings == "lm" and g.ok), None)
            if g is not None:
                rows.append(Verdict("weight handling for B (1 seed where swept)", spec,
                                    f"val loss {g.rows[0]['final_val_loss']:.4f}, {g.stat('training_bytes_per_param')[0]:.2f} training B/param",
                                    "measured"))  # fmt: skip
        rel = next((g for g in groups if g.settings == "lm-release" and g.ok), None)
        if rel is not None:
            rows.append(Verdict("E with gradient release (no clipping)", rel.optimizer,
                                f"val loss {rel.rows[0]['final_val_loss']:.4f}, {rel.stat('training_bytes_per_param')[0]:.2f} training B/param",
                                "measured"))  # fmt: skip
        return rows


PROTOCOL = WeightSplitting()
