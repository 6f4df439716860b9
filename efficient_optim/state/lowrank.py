"""Low-rank storage of a matrix-shaped state: thin factors ``U`` (s x r) and ``V`` (l x r), ``X ~ U V^T``.

A parameter of shape ``(d0, d1, ...)`` is viewed as the matrix ``(d0, d1 * ...)`` and oriented so that
``X`` is (short side s) x (long side l) (transposed when ``d0`` is the longer side): the basis ``U`` lives
on the short side, where a rank-r subspace covers the largest fraction of the directions (as GaLore
projects the short side). The codec keeps, for a state ``name``:

- ``name.u``: (s, r) float32, always with orthonormal columns;
- ``name.v``: (l, r) float32, so that ``U V^T`` is the stored (oriented) matrix (``V = X^T U``: the
  coefficients of the orthogonal projection of ``X`` onto ``span(U)``);
- ``name.meta``: int64 ``[encodes, svd_failures]`` (refresh schedule, random test matrices, diagnostics).

``r (m + n)`` floats instead of ``m n``. Tensors with fewer than 2 dimensions or ``min_numel`` elements,
and matrices where ``rank > max_rank_fraction * min(m, n)``, keep a dense fp32 state under ``name``:
with ``max_rank_fraction = 0.5`` (default) a square matrix's factors would be as large as the dense
state, so there is nothing to gain above that.

What ``encode(X)`` stores (X is the full-precision value the update rule produced, e.g. the exact EMA
update ``beta * decode() + (1 - beta) * g``), by ``refresh``:

- ``"randomized"``: every ``refresh_every`` encodes (and on the first), ``U`` is recomputed from ``X`` by
  a randomized SVD (Halko, Martinsson & Tropp 2011: Gaussian test matrix with ``oversample`` extra
  columns, ``power_iters`` subspace iterations, QR-orthonormalized each time); between refreshes ``U``
  is kept and ``V = X^T U``. For an EMA this is exactly the update done in the factored space:
  ``V <- beta V + (1 - beta) g^T U``.
- ``"periodic"``: the same schedule, the basis from an exact truncated SVD (``torch.linalg.svd``) — the
  GaLore-style periodic projection applied to the stored state. (The GaLore *algorithm*, where the
  gradient is projected and both moments live in the r x n projected space, is a different method and
  is ``LowRankAdam(update_strategy="periodic")``.)
- ``"online"``: every encode moves both factors by one subspace iteration warm-started from the
  previous ``V``: ``U <- orth(X V)``, ``V <- X^T U``. For an EMA target ``X = beta U V^T + (1 - beta) g``,
  ``X V (V^T V)^-1 = U - (1 - beta) (U V^T - g) V (V^T V)^-1``: one preconditioned gradient step of size
  ``1 - beta`` on ``1/2 ||U V^T - g||^2`` in ``U`` ("momentum as online regression", LoRA-Pre), then the
  least-squares ``V`` for the new ``U``. ``refresh_every`` re-factors from scratch by randomized SVD
  (0: only on the first encode).

In every mode ``U`` stays orthonormal, so ``||X - U V^T||^2 = ||X||^2 - ||V||^2`` (``relative_error``) and
the singular values of the stored matrix are those of ``V`` (``singular_values``): both are cheap.

``nonnegative=True`` (for second moments) stores the low-rank approximation of ``sqrt(X)`` and decodes
its square, so the decoded state is never negative. A factored (row/column) second moment is usually
the better choice; see docs/lowrank_adam.md.

SVD failures: if the randomized or exact SVD raises (``torch.linalg`` non-convergence) or returns
non-finite numbers, the previous basis is kept (``V = X^T U``); on the very first encode a QR of the
sketch is used instead, and if that fails too the first ``r`` coordinate vectors. Each failure is counted
in ``name.meta`` (``svd_failures``). Nothing non-finite is ever stored.

Randomness: the Gaussian test matrix comes from a generator seeded with ``(seed, salt, encode count)``,
never from the global RNG, so a resumed run draws the same matrices.

Workspace: a refresh needs the sketch, the basis and a small SVD (``workspace_numel`` floats, see
there). ``encode(..., workspace=buf)`` carves them out of a caller-owned fp32 buffer (LowRankAdam keeps
one, sized for its largest matrix, and reports it in ``shared_state_tensors()`` so ``state_bytes``
counts it); without it they are allocated for the call. LAPACK's internal scratch is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant.rounding import mix_salt
from .codec import StateCodec

LOWRANK_REFRESH = ("randomized", "periodic", "online")
META_ENCODES, META_FAILURES = 0, 1


class LowRankFailure(RuntimeError):
    """An SVD/QR of a low-rank refresh raised or produced non-finite numbers."""


# ------------------------------------------------------------------------------------- linear algebra
class Arena:
    """Hands out consecutive views of a flat fp32 buffer; allocates when there is none or it is full."""

    def __init__(self, buffer: torch.Tensor | None, device):
        self.buffer, self.offset, self.device = buffer, 0, device

    def take(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.buffer
        if buf is None or self.offset + n > buf.numel() or buf.device != torch.device(self.device):
            return torch.empty(shape, dtype=torch.float32, device=self.device)
        view = buf[self.offset : self.offset + n].view(shape)
        self.offset += n
        return view


def sketch_width(rank: int, oversample: int, m: int, n: int) -> int:
    return min(rank + oversample, m, n)


def randomized_svd_numel(m: int, n: int, rank: int, oversample: int) -> int:
    """Floats of workspace ``randomized_svd`` takes from an ``Arena`` for an m x n matrix:
    ``2 k (m + n) + 4 k^2 + k`` with ``k = min(rank + oversample, m, n)``."""
    k = sketch_width(rank, oversample, m, n)
    # omega/z (n k), y (m k), q (m k), r (k k), qz (n k), rz (k k), ub (k k), s (k), vh (k k)
    return 2 * k * (m + n) + 4 * k * k + k


def _check_finite(*ts: torch.Tensor) -> None:
    for t in ts:
        if not bool(torch.isfinite(t).all()):
            raise LowRankFailure("non-finite values in an SVD/QR result")


def _qr_into(a: torch.Tensor, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    try:
        torch.linalg.qr(a, mode="reduced", out=(q, r))
    except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
        raise LowRankFailure(f"QR failed: {exc}") from exc
    return q


def _qr(a: torch.Tensor, arena: Arena) -> torch.Tensor:
    return _qr_into(a, arena.take(*a.shape), arena.take(a.shape[1], a.shape[1]))


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    arena: Arena | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD of ``a`` (m x n) by the randomized range finder (Halko et al. 2011).

    A Gaussian n x k test matrix (``k = rank + oversample``, at most ``min(m, n)``), ``power_iters``
    QR-stabilized subspace iterations, then the exact SVD of the small k x n projection.
    Returns ``(U, S, W)`` with ``U`` (m x r) and ``W`` (n x r) orthonormal and ``a ~ U diag(S) W^T``.
    Exact (to float precision) when ``rank(a) <= rank``. ``LowRankFailure`` if a factorization raises or
    returns non-finite numbers. Scratch comes from ``arena`` (``randomized_svd_numel`` floats).
    """
    m, n = a.shape
    k = sketch_width(rank, oversample, m, n)
    arena = arena or Arena(None, a.device)
    omega, y, q, r = arena.take(n, k), arena.take(m, k), arena.take(m, k), arena.take(k, k)
    qz, rz = arena.take(n, k), arena.take(k, k)
    ub, s, vh = arena.take(k, k), arena.take(k), arena.take(k, k)
    torch.randn(n, k, generator=generator, out=omega)
    torch.mm(a, omega, out=y)
    _qr_into(y, q, r)
    for _ in range(power_iters):
        torch.mm(a.t(), q, out=omega)  # omega is free: reuse it for A^T Q
        _qr_into(omega, qz, rz)
        torch.mm(a, qz, out=y)
        _qr_into(y, q, r)
    # A ~ Q Q^T A = Q (A^T Q)^T = Q (Qz Rz)^T = Q Rz^T Qz^T: the SVD of the k x k matrix Rz^T finishes it
    # (no k x n intermediate, unlike the textbook B = Q^T A)
    torch.mm(a.t(), q, out=omega)
    _qr_into(omega, qz, rz)
    try:
        torch.linalg.svd(rz.t(), full_matrices=False, out=(ub, s, vh))
    except RuntimeError as exc:
        raise LowRankFailure(f"SVD failed: {exc}") from exc
    _check_finite(s, ub, vh)
    u = q @ ub[:, :rank]
    w = qz @ vh[:rank].t()
    _check_finite(u)
    return u, s[:rank].clone(), w


def exact_truncated_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd`` truncated to ``rank``: ``(U, S, W)`` as ``randomized_svd`` returns them."""
    try:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    except RuntimeError as exc:
        raise LowRankFailure(f"SVD failed: {exc}") from exc
    _check_finite(s, u)
    return u[:, :rank], s[:rank], vh[:rank].t()


def fallback_basis(a: torch.Tensor, rank: int, generator: torch.Generator | None) -> torch.Tensor:
    """An orthonormal (m x r) basis when the SVD failed and no previous one exists: QR of a Gaussian sketch
    of ``a``; if that fails too, the first ``r`` coordinate vectors (always valid)."""
    m, n = a.shape
    try:
        omega = torch.randn(n, rank, generator=generator, device=a.device)
        q = _qr(a @ omega, Arena(None, a.device))
        _check_finite(q)
        return q
    except LowRankFailure:
        return torch.eye(m, rank, device=a.device)


def entropy_rank(s: torch.Tensor) -> float | None:
    """Effective rank ``exp(H(p))`` with ``p = s / sum(s)`` (Roy & Vetterli 2007); None for a zero matrix."""
    s = s.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0 or not math.isfinite(total):
        return None
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(s: torch.Tensor, rtol: float = 1e-3) -> int:
    """Singular values above ``rtol`` times the largest."""
    if s.numel() == 0 or float(s.max()) <= 0:
        return 0
    return int((s > rtol * s.max()).sum())


def matrix_shape(param: torch.Tensor) -> tuple[int, int] | None:
    """``(d0, d1 * d2 * ...)`` for tensors of >= 2 dimensions, None otherwise."""
    if param.dim() < 2:
        return None
    return int(param.shape[0]), int(math.prod(param.shape[1:]))


# -------------------------------------------------------------------------------------------- codec
@dataclass(frozen=True)
class LowRank(StateCodec):
    """Rank-``rank`` factors of a matrix-shaped state (dense fp32 for vectors, small or near-square-rank tensors).

    Args:
        rank: number of factor columns r (>= 1).
        refresh: ``"randomized"`` (default), ``"periodic"`` or ``"online"`` (see the module docstring).
        refresh_every: re-factor from scratch every this many encodes (>= 1; for ``"online"`` 0 means only
            on the first encode). Default 10.
        oversample: extra sketch columns of the randomized SVD (default 8).
        power_iters: subspace iterations of the randomized SVD (default 2).
        seed: seed of the random test matrices (mixed with the caller's salt and the encode count).
        nonnegative: store ``sqrt(X)`` in low rank and decode its square (for second moments). Default False.
        min_numel: tensors with fewer elements stay dense (default 4096).
        max_rank_fraction: matrices with ``rank > max_rank_fraction * min(m, n)`` stay dense (default 0.5;
            1.0 allows full rank, for tests).
    """

    rank: int = 16
    refresh: str = "randomized"
    refresh_every: int = 10
    oversample: int = 8
    power_iters: int = 2
    seed: int = 0
    nonnegative: bool = False
    min_numel: int = 4096
    max_rank_fraction: float = 0.5

    def __post_init__(self):
        def bad_int(v, lo):
            return not isinstance(v, int) or isinstance(v, bool) or v < lo

        if bad_int(self.rank, 1):
            raise ValueError(f"invalid rank: {self.rank!r} (must be an integer >= 1)")
        if self.refresh not in LOWRANK_REFRESH:
            raise ValueError(f"invalid refresh: {self.refresh!r} (choose one of {list(LOWRANK_REFRESH)})")
        if bad_int(self.refresh_every, 0 if self.refresh == "online" else 1):
            lo = 0 if self.refresh == "online" else 1
            raise ValueError(f"invalid refresh_every: {self.refresh_every!r} (must be an integer >= {lo})")
        if bad_int(self.oversample, 0):
            raise ValueError(f"invalid oversample: {self.oversample!r} (must be an integer >= 0)")
        if bad_int(self.power_iters, 0):
            raise ValueError(f"invalid power_iters: {self.power_iters!r} (must be an integer >= 0)")
        if bad_int(self.seed, 0):
            raise ValueError(f"invalid seed: {self.seed!r} (must be an integer >= 0)")
        if bad_int(self.min_numel, 0):
            raise ValueError(f"invalid min_numel: {self.min_numel!r} (must be an integer >= 0)")
        f = self.max_rank_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"invalid max_rank_fraction: {f!r} (must be in (0, 1])")

    # ------------------------------------------------------------------------------ eligibility
    def is_lowrank(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s state is stored as factors (else dense fp32)."""
        shape = matrix_shape(param)
        if shape is None or param.numel() < self.min_numel:
            return False
        return self.rank <= self.max_rank_fraction * min(shape)

    @property
    def error_kind(self) -> str:
        return "lowrank"

    def error_kind_for(self, param) -> str:
        """``"lowrank"`` where ``param``'s state is stored as factors, ``"none"`` where it is dense fp32."""
        return "lowrank" if self.is_lowrank(param) else "none"

    def describe(self, param=None) -> str:
        """``"lowrank(r=<rank>)"`` (``"fp32"`` for a parameter whose state is dense)."""
        return "fp32" if param is not None and not self.is_lowrank(param) else f"lowrank(r={self.rank})"

    def for_dtensor(self, param):
        """For dim-0 (FSDP2 row) shards: the factor whose rows are the parameter's rows sharded like them, the
        other replicated (``sharded.ShardedLowRank``); the whole state on every rank for other placements."""
        from .dtensor_shards import shards_rows_only
        from .sharded import ShardedLowRank

        if shards_rows_only(param):
            return ShardedLowRank(self)
        return super().for_dtensor(param)

    @staticmethod
    def oriented_shape(param: torch.Tensor) -> tuple[int, int, bool]:
        """``(short, long, transposed)`` of the parameter's matrix view."""
        m, n = matrix_shape(param)
        return (n, m, True) if m > n else (m, n, False)

    def expected(self, name, param):
        if not self.is_lowrank(param):
            return {name: (tuple(param.shape), torch.float32)}
        short, long, _ = self.oriented_shape(param)
        return {f"{name}.u": ((short, self.rank), torch.float32), f"{name}.v": ((long, self.rank), torch.float32),
                f"{name}.meta": ((2,), torch.int64)}  # fmt: skip

    def init(self, state, name, param):
        for key, (shape, dtype) in self.expected(name, param).items():
            state[key] = torch.zeros(shape, dtype=dtype, device=param.device)

    def workspace_numel(self, param: torch.Tensor) -> int:
        """Floats of scratch one encode of ``param`` needs at most (0 for dense states).

        Randomized refresh: ``randomized_svd_numel`` (sketch, basis, power-iteration products, a k x k
        SVD). Periodic: a full ``torch.linalg.svd`` of the matrix (its input copy, U, S and V^T).
        Online: ``X V`` and an r x r factor (and the randomized refresh of the first encode). The decoded
        (param-shaped) view every codec returns is not included (it is the rule's working copy, as for
        any codec).
        """
        if not self.is_lowrank(param):
            return 0
        short, long, _ = self.oriented_shape(param)
        if self.refresh == "periodic":
            return 2 * short * long + short * short + short
        ws = randomized_svd_numel(short, long, self.rank, self.oversample)
        if self.refresh == "online":
            ws = max(ws, short * self.rank + self.rank * self.rank)
        return ws

    # -------------------------------------------------------------------------------- decode/encode
    def decode(self, state, name, param):
        if name in state:
            return state[name]
        u, v = state[f"{name}.u"], state[f"{name}.v"]
        out = (
            v @ u.t() if self.oriented_shape(param)[2] else u @ v.t()
        )  # X^T = V U^T: param-oriented without a copy
        if self.nonnegative:
            out.square_()
        return out.view(param.shape)

    @staticmethod
    def matrix(value: torch.Tensor) -> torch.Tensor:
        """The oriented fp32 matrix view of a param-shaped tensor: (short side) x (long side)."""
        x = value.reshape(value.shape[0], -1)
        if x.dtype != torch.float32:
            x = x.float()
        return x.t() if x.shape[0] > x.shape[1] else x

    def _matrix(self, value):
        x = self.matrix(value)
        return x.clamp_min(0).sqrt_() if self.nonnegative else x

    def generator(self, device, salt: int, count: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(mix_salt(self.seed, salt, count))

    def encode(self, state, name, value, *, salt=0, workspace: torch.Tensor | None = None):
        if name in state:  # dense fallback
            if state[name].data_ptr() != value.data_ptr():
                state[name].copy_(value)
            return
        u, v, meta = state[f"{name}.u"], state[f"{name}.v"], state[f"{name}.meta"]
        x = self._matrix(value)
        count = int(meta[META_ENCODES])
        arena = Arena(workspace, x.device)
        every = self.refresh_every
        refresh = count == 0 or (every > 0 and count % every == 0)
        try:
            if refresh and self.refresh == "periodic":
                new_u, _, _ = exact_truncated_svd(x, self.rank)
                u.copy_(new_u)
            elif refresh:
                new_u, _, _ = randomized_svd(x, self.rank, oversample=self.oversample, power_iters=self.power_iters,
                                             generator=self.generator(x.device, salt, count), arena=arena)  # fmt: skip
                u.copy_(new_u)
            elif self.refresh == "online":
                y = arena.take(x.shape[0], self.rank)
                torch.mm(x, v, out=y)
                q = _qr(y, arena)
                _check_finite(q)
                u.copy_(q)
        except LowRankFailure:
            meta[META_FAILURES] += 1
            if count == 0:  # no previous basis to keep
                u.copy_(fallback_basis(x, self.rank, self.generator(x.device, salt, count)))
        torch.mm(x.t(), u, out=v)
        meta[META_ENCODES] += 1

    # ------------------------------------------------------------------------------- diagnostics
    def factors(self, state, name) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U, V)`` of a low-rank state (``U`` orthonormal, on the short side; see ``matrix``), None for a
        dense one."""
        if f"{name}.u" not in state:
            return None
        return state[f"{name}.u"], state[f"{name}.v"]

    def relative_error(self, state, name, value) -> torch.Tensor | None:
        """``||X - U V^T|| / ||X||`` of the last ``encode(value)`` (X: the matrix of ``value``; of
        ``sqrt(value)`` when nonnegative); 0-d tensor, None for a dense state."""
        if f"{name}.u" not in state:
            return None
        x2 = self._matrix(value).square().sum()
        v2 = state[f"{name}.v"].square().sum()
        return torch.where(x2 > 0, (1 - v2 / x2.clamp_min(1e-38)).clamp_min(0).sqrt(), torch.zeros_like(x2))

    def singular_values(self, state, name) -> torch.Tensor | None:
        """Singular values of the stored matrix ``U V^T`` (those of ``V``: ``U`` is orthonormal)."""
        if f"{name}.v" not in state:
            return None
        try:
            return torch.linalg.svdvals(state[f"{name}.v"])
        except RuntimeError:
            return None

    def svd_failures(self, state, name) -> int:
        meta = state.get(f"{name}.meta")
        return 0 if meta is None else int(meta[META_FAILURES])
