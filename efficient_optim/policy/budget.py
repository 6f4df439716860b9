"""``Budget``: per-layer adaptive precision under a hard memory budget for the optimizer's states.

``QAdamW(model.named_parameters(), policy=Budget(bytes_per_param=1.5))`` (or ``bytes=...``; any optimizer of
the library whose states are chosen by spec) stores each state of each parameter with the codec an allocator
picks among candidates (fp32, bf16, 8-bit, 4-bit, and a factored second moment), so that ``state_bytes`` never
exceeds the budget: every plan is sized exactly before it is used (``codec.expected``), re-plans shrink states
before they grow others, and a plan that would not fit is never applied.

Allocators (``allocator=``):

- ``"fixed"``: a depth/type rule: embeddings, then parameters in model order, each at its most precise
  candidate while the budget allows; the rest at the cheapest. Decided once.
- ``"data"``: starts from the fixed rule; after ``warmup`` steps it measures each state's relative error under
  every candidate on the step's exact values (the codecs' own encode, on a sample of the state) and solves the
  allocation as a knapsack (least error per byte; ``policy.allocators``); decided once more.
- ``"dynamic"``: the data-driven allocation re-solved every ``every`` steps from running (EMA) error
  statistics; a state changes codec only when the solver asked for the same change ``patience`` times in a
  row (hysteresis), and every change is counted (``transitions``).

Errors are weighted by the parameter's size, by a sensitivity estimate (its gradient RMS relative to the other
parameters': to first order the loss moves by ``g . du``) and by how a state's error reaches the update (Adam's
update is linear in m and goes with ``1/sqrt(v)``: a relative error d in v moves it by about d/2). The
gradient's variance and kurtosis are recorded with the RMS (``grad_stats``, for reports); they predict how badly
a state quantizes, which the candidates' errors measure directly.
"""

from __future__ import annotations

import torch

from .allocators import ALLOCATORS, Item
from .policies import Policy
from .specs import keeps_full_precision

M_CANDIDATES = ("4bit", "8bit", "bf16", "fp32")  # cheapest first
V_CANDIDATES = ("factored", "4bit", "8bit", "bf16", "fp32")
PRIOR_ERROR = {"fp32": 0.0, "bf16": 4e-3, "8bit": 2e-2, "4bit": 0.15, "factored": 0.3}  # before any measurement
STATE_WEIGHT = {"m": 1.0, "v": 0.25}  # squared: a relative error d in v changes Adam's update by ~d/2
SAMPLE_ELEMENTS = 1 << 15  # elements of a state measured per candidate at a monitoring step


def codec_bytes(codec, name: str, param: torch.Tensor) -> int:
    """Exact bytes ``codec`` keeps for state ``name`` of ``param`` (from ``codec.expected``)."""
    total = 0
    for shape, dtype in codec.expected(name, param).values():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


class Budget(Policy):
    """Adaptive precision under a hard budget for the optimizer's state memory.

    Args:
        bytes: the budget in bytes of optimizer state (what ``efficient_optim.state_bytes`` reports).
        bytes_per_param: the budget per parameter element (e.g. 1.5; fp32 AdamW holds 8); one of the two.
        allocator: ``"fixed"``, ``"data"`` (default) or ``"dynamic"`` (see the module docstring).
        warmup: steps before the first measurement (default 20).
        every: steps between re-plans of the dynamic allocator (default 50).
        patience: consecutive re-plans that must ask for the same change before it is made (default 2).
        ema: weight of the newest measurement in the running error statistics (default 0.5).
        m_candidates, v_candidates: specs a signed / non-negative state may get, cheapest first (defaults
            ``M_CANDIDATES`` / ``V_CANDIDATES``).

    Raises ``ValueError`` when even the cheapest plan does not fit, naming the smallest feasible budget.
    """

    dynamic = True

    def __init__(self, bytes: int | None = None, bytes_per_param: float | None = None, *, allocator: str = "data",
                 warmup: int = 20, every: int = 50, patience: int = 2, ema: float = 0.5,
                 m_candidates=M_CANDIDATES, v_candidates=V_CANDIDATES):  # fmt: skip
        if (bytes is None) == (bytes_per_param is None):
            raise ValueError("Budget: give exactly one of bytes= or bytes_per_param=")
        for name, value in (("bytes", bytes), ("bytes_per_param", bytes_per_param)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"Budget: invalid {name}: {value!r} (a number > 0)")
        if allocator not in ("fixed", "data", "dynamic"):
            raise ValueError(f"Budget: invalid allocator {allocator!r} (choose 'fixed', 'data' or 'dynamic')")
        for name, value, low in (("warmup", warmup, 1), ("every", every, 1), ("patience", patience, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Budget: invalid {name}: {value!r} (an integer >= {low})")
        if not 0 < ema <= 1:
            raise ValueError(f"Budget: invalid ema: {ema!r} (in (0, 1])")
        self.bytes, self.bytes_per_param, self.allocator = bytes, bytes_per_param, allocator
        self.warmup, self.every, self.patience, self.ema = warmup, every, patience, ema
        self.candidates = {"m": tuple(m_candidates), "v": tuple(v_candidates)}
        self.steps, self.transitions, self.gap = 0, 0, 0.0
        self.items: dict[tuple[int, str], Item] = {}
        self.choice: dict[tuple[int, str], int] = {}
        self.pending: dict[tuple[int, str], list] = {}  # key -> [proposed index, times in a row]
        self.errors: dict[tuple[int, str], dict] = {}  # key -> {spec: running relative error}
        self.grad_stats: dict[int, dict] = {}  # param index -> running gradient RMS, variance, kurtosis
        self.limit = 0
        self.fixed_bytes = 0
        self._tables: dict = {}  # (item key, candidate) -> {storage: bytes} of its shared tables
        self.numels: dict[int, int] = {}  # param index -> its number of elements

    def __repr__(self) -> str:
        size = f"bytes={self.bytes}" if self.bytes is not None else f"bytes_per_param={self.bytes_per_param}"
        return f"Budget({size}, allocator={self.allocator!r})"

    # --------------------------------------------------------------------------------- planning
    def bind(self, optimizer) -> None:
        """Size every candidate of every state of every parameter and make the first (fixed-rule) plan."""
        index = 0
        self.items, self.fixed_bytes, self._tables, self.numels = {}, 0, {}, {}
        weight_bytes = getattr(optimizer, "weight_state_bytes", None)
        for group in optimizer.param_groups:
            for position, p in enumerate(group["params"]):
                self.numels[index] = p.numel()  # global size (a DTensor reports the whole parameter's)
                self.fixed_bytes += 4  # the step counter
                if weight_bytes is not None:  # bf16 weights' correction codes or Kahan buffers: fixed, counted
                    self.fixed_bytes += weight_bytes(p, group)
                defaults = optimizer.default_specs(p, group)
                name_of = group.get("param_names")
                pname = name_of[position] if name_of else ""
                for name in defaults:
                    self._add_item(optimizer, group, index, p, name, pname)
                index += 1
        if any(_is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
            self._sum_over_ranks()  # each rank sized its own shard's states: the budget is over all of them
        numel = sum(self.numels.values())
        self.limit = int(self.bytes if self.bytes is not None else self.bytes_per_param * numel)
        cheapest = {k: it.cheapest() for k, it in self.items.items()}
        floor = self.plan_bytes(cheapest)
        if floor > self.limit:
            raise ValueError(f"Budget: {self.limit} bytes cannot hold the optimizer's states; the cheapest plan "
                             f"needs {floor} bytes ({floor / max(numel, 1):.3f} bytes per parameter)")  # fmt: skip
        self.choice, _ = self._allocate("fixed")

    def plan_bytes(self, choice: dict) -> int:
        """Exact bytes of a plan: step counters, every state, and each shared quantization table once."""
        tables: dict[int, int] = {}
        for key, i in choice.items():
            tables.update(self._tables.get((key, i), {}))
        return self.fixed_bytes + sum(self.items[k].nbytes[i] for k, i in choice.items()) + sum(tables.values())

    def _allocate(self, allocator: str) -> tuple[dict, float]:
        """The allocator's plan within the budget. Shared tables are not additive per state, so the states get
        the budget less the cheapest plan's tables; when the tables of the plan made then do not fit, the largest
        states' budget whose exact plan fits is found by bisection. The cheapest plan (which fits: checked in
        ``bind``) is the fallback."""
        items = list(self.items.values())
        cheapest = {it.key: it.cheapest() for it in items}
        states = sum(it.nbytes[cheapest[it.key]] for it in items)
        hi = self.limit - (self.plan_bytes(cheapest) - states)
        choice, gap = ALLOCATORS[allocator](items, hi)
        if self.plan_bytes(choice) <= self.limit:
            return choice, gap
        # The tables the plan added (an 8-bit map: tens of KB) did not fit. Taking their whole excess off the
        # states' budget can leave it below what the cheapest plan needs (the plan then falls back to the
        # cheapest, the budget unused): bisect instead for the largest states' budget whose exact plan fits.
        best, lo = (cheapest, float("inf")), states
        while hi - lo > 1:
            mid = (lo + hi) // 2
            choice, gap = ALLOCATORS[allocator](items, mid)
            if self.plan_bytes(choice) <= self.limit:
                best, lo = (choice, gap), mid
            else:
                hi = mid
        return best

    def _add_item(self, optimizer, group, index, p, name, pname) -> None:
        prefix = optimizer.STATE_PREFIX[name]
        specs = [s for s in self.candidates[prefix] if not (s == "factored" and p.dim() < 2)]
        if keeps_full_precision("8bit", p, group.get("min_quantize_numel", 4096)):
            specs = ["fp32"]  # the small-tensor rule: one fixed choice
        nbytes = []
        for spec in specs:
            codec = optimizer.resolve_spec(name, spec, p, group)
            stored = codec.for_dtensor(p) if _is_dtensor(p) else codec  # a shard's own layout under FSDP2
            nbytes.append(codec_bytes(stored, name, p))
            self._tables[((index, name), len(nbytes) - 1)] = {
                t.data_ptr(): t.numel() * t.element_size() for t in codec.shared_tensors().values()}
        embedding = any(k in pname for k in ("wte", "wpe", "embed"))
        item = Item((index, name), specs, nbytes, [0.0] * len(specs), priority=(0 if embedding else 1, index))
        self.items[item.key] = item
        self._set_errors(item, prefix, p.numel(), {s: PRIOR_ERROR.get(s, 0.1) for s in specs})

    def _set_errors(self, item: Item, prefix: str, numel: int, rel: dict) -> None:
        w = STATE_WEIGHT[prefix] * numel
        item.error = [w * rel.get(s, PRIOR_ERROR.get(s, 0.1)) ** 2 for s in item.specs]

    def choose(self, info, defaults):
        out = dict(defaults)
        for name in defaults:
            key = (info.index, name)
            if key in self.choice:
                out[name] = self.items[key].specs[self.choice[key]]
        return out

    def planned_bytes(self) -> int:
        """Bytes of the current plan (what ``state_bytes`` reports once every state exists)."""
        return self.plan_bytes(self.choice)

    # ---------------------------------------------------------------------------------- re-plans
    def replan(self, optimizer):
        self.steps += 1
        measure_now = self.steps == self.warmup or (
            self.allocator == "dynamic" and self.steps > self.warmup and (self.steps - self.warmup) % self.every == 0)
        if self.allocator != "fixed" and measure_now:
            optimizer.request_error_stats(optimizer.planned_params())
        solve_now = self.allocator != "fixed" and self.steps > self.warmup and (
            self.steps == self.warmup + 1 or (self.allocator == "dynamic" and (self.steps - self.warmup - 1) % self.every == 0))
        if not solve_now or not self.errors:
            return []
        return self._solve(optimizer)

    def _sum_over_ranks(self) -> None:
        """Item bytes and fixed bytes summed over the ranks (collective: every rank calls it in ``bind``); shared
        tables are held by every rank, so they count once per rank."""
        import torch.distributed as dist

        keys = sorted(self.items)
        flat = [float(self.fixed_bytes)] + [float(b) for k in keys for b in self.items[k].nbytes]
        table_keys = sorted(self._tables)
        flat += [float(sum(self._tables[k].values())) for k in table_keys]
        t = torch.tensor(flat, dtype=torch.float64)
        dist.all_reduce(t)
        values = [int(round(v)) for v in t.tolist()]
        self.fixed_bytes, pos = values[0], 1
        for k in keys:
            n = len(self.items[k].nbytes)
            self.items[k].nbytes = values[pos:pos + n]
            pos += n
        for k in table_keys:  # one pseudo-table per candidate: the ranks' copies together
            self._tables[k] = {hash(k): values[pos]} if self._tables[k] else {}
            pos += 1

    def _agree_errors(self) -> None:
        """The ranks' error statistics averaged (collective), so every rank solves the same allocation."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        slots = [(k, s) for k in sorted(self.items) for s in self.items[k].specs]
        values = torch.tensor([[self.errors.get(k, {}).get(s, 0.0), float(s in self.errors.get(k, {}))]
                               for k, s in slots], dtype=torch.float64).reshape(-1, 2)  # fmt: skip
        dist.all_reduce(values)
        for (k, s), (total, count) in zip(slots, values.tolist()):
            if count > 0:
                self.errors.setdefault(k, {})[s] = total / count
        indices = sorted({k[0] for k in self.items})  # and the gradient statistics the sensitivities come from
        names = ("rms", "variance", "kurtosis")
        grads = torch.tensor([[self.grad_stats.get(i, {}).get(n, 0.0) for n in names] + [float(i in self.grad_stats)]
                              for i in indices], dtype=torch.float64).reshape(-1, len(names) + 1)  # fmt: skip
        dist.all_reduce(grads)
        for i, row in zip(indices, grads.tolist()):
            if row[-1] > 0:
                self.grad_stats[i] = {n: v / row[-1] for n, v in zip(names, row)}

    def _solve(self, optimizer):
        self._agree_errors()
        for key, item in self.items.items():
            if key in self.errors:
                prefix = optimizer.STATE_PREFIX[key[1]]
                weight = self.numels[key[0]] * self.sensitivity(key[0])
                self._set_errors(item, prefix, weight, self.errors[key])
        proposal, self.gap = self._allocate("data")
        accepted = dict(self.choice)
        for key, index in proposal.items():
            if index == self.choice.get(key):
                self.pending.pop(key, None)
                continue
            count = self.pending.get(key, [None, 0])
            count = [index, count[1] + 1 if count[0] == index else 1]
            self.pending[key] = count
            if count[1] >= self.patience or self.allocator == "data":
                accepted[key] = index
        accepted = self._fit(accepted)
        return self._changes(optimizer, accepted)

    def _fit(self, accepted: dict) -> dict:
        """``accepted`` with upgrades reverted (largest first) until the plan fits the budget."""
        total = self.plan_bytes
        grown = sorted((k for k in accepted if self.items[k].nbytes[accepted[k]] > self.items[k].nbytes[self.choice[k]]),
                       key=lambda k: self.items[k].nbytes[accepted[k]] - self.items[k].nbytes[self.choice[k]], reverse=True)  # fmt: skip
        while total(accepted) > self.limit and grown:
            k = grown.pop(0)
            accepted[k] = self.choice[k]
        return accepted

    def _changes(self, optimizer, accepted: dict):
        """The optimizer's ``(param, {state: spec})`` changes, shrinking states first so memory never peaks
        above the budget while they are applied."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        changed = [k for k in accepted if accepted[k] != self.choice[k]]
        changed.sort(key=lambda k: self.items[k].nbytes[accepted[k]] - self.items[k].nbytes[self.choice[k]])
        out = []
        for k in changed:
            self.transitions += 1
            self.pending.pop(k, None)
            self.choice[k] = accepted[k]
            if params[k[0]] in optimizer._plans:
                out.append((params[k[0]], {k[1]: self.items[k].specs[accepted[k]]}))
        return out

    # ------------------------------------------------------------------------------- monitoring
    @torch.no_grad()
    def observe(self, optimizer, index: int, param: torch.Tensor, group: dict, values: dict, grad=None) -> None:
        """Record, from one step's exact state ``values`` (before encoding), the relative error every candidate
        of each state would make (measured on a sample of at most ``SAMPLE_ELEMENTS`` elements), and the
        gradient's statistics (``grad``: RMS, variance, kurtosis; running EMAs per parameter)."""
        if grad is not None:
            self._gradient_stats(index, grad)
        for name, value in values.items():
            value = value.to_local() if _is_dtensor(value) else value  # this rank's shard (errors are averaged)
            key = (index, name)
            item = self.items.get(key)
            if item is None or len(item.specs) == 1:
                continue
            sample = _sample(value.float())
            norm = sample.norm()
            stats = self.errors.setdefault(key, {})
            for spec in item.specs:
                codec = optimizer.resolve_spec(name, spec, param, group)
                tmp: dict = {}
                codec.init(tmp, name, sample)
                codec.encode(tmp, name, sample.clone())
                err = float((codec.decode(tmp, name, sample) - sample).norm() / norm) if norm > 0 else 0.0
                stats[spec] = err if spec not in stats else (1 - self.ema) * stats[spec] + self.ema * err

    def _gradient_stats(self, index: int, grad: torch.Tensor) -> None:
        g = _sample((grad.to_local() if _is_dtensor(grad) else grad).float()).reshape(-1)
        mean = g.mean()
        var = float(((g - mean) ** 2).mean())
        kurtosis = float(((g - mean) ** 4).mean() / var**2) if var > 0 else 0.0
        new = {"rms": float(g.square().mean().sqrt()), "variance": var, "kurtosis": kurtosis}
        old = self.grad_stats.get(index)
        self.grad_stats[index] = new if old is None else {k: (1 - self.ema) * old[k] + self.ema * v for k, v in new.items()}

    def sensitivity(self, index: int) -> float:
        """How much an error in this parameter's update costs, relative to the average parameter: the ratio of
        its gradient RMS to the mean RMS over the measured parameters (a first-order estimate: the loss moves by
        ``g . du``), clamped to [0.1, 10]; 1.0 before any measurement."""
        if index not in self.grad_stats:
            return 1.0
        mean = sum(s["rms"] for s in self.grad_stats.values()) / len(self.grad_stats)
        return min(10.0, max(0.1, self.grad_stats[index]["rms"] / mean)) if mean > 0 else 1.0

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        def keyed(d):
            return {f"{i}:{n}": v for (i, n), v in d.items()}

        return {"steps": self.steps, "transitions": self.transitions, "gap": self.gap, "choice": keyed(self.choice),
                "pending": keyed(self.pending), "errors": keyed(self.errors),
                "grad_stats": {str(i): s for i, s in self.grad_stats.items()}}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        def unkeyed(d):
            return {(int(k.split(":", 1)[0]), k.split(":", 1)[1]): v for k, v in d.items()}

        self.steps, self.transitions, self.gap = int(state["steps"]), int(state["transitions"]), float(state["gap"])
        self.choice = {k: int(v) for k, v in unkeyed(state["choice"]).items()}
        self.pending = {k: list(v) for k, v in unkeyed(state["pending"]).items()}
        self.errors = {k: dict(v) for k, v in unkeyed(state["errors"]).items()}
        self.grad_stats = {int(i): dict(s) for i, s in state.get("grad_stats", {}).items()}


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _sample(value: torch.Tensor) -> torch.Tensor:
    """A contiguous part of a state shaped like a parameter: whole rows of its matrix view (so a factored
    codec sees rows and columns), at most ``SAMPLE_ELEMENTS`` elements."""
    if value.dim() >= 2:
        rows = value.reshape(value.shape[0], -1)
        keep = max(1, min(rows.shape[0], SAMPLE_ELEMENTS // max(rows.shape[1], 1)))
        return rows[:keep].contiguous()
    return value.reshape(-1)[:SAMPLE_ELEMENTS].contiguous()
