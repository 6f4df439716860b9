"""Adafactor's factored step with every operation in a fixed order: the arithmetic of its fused kernel.

The reference path (``optim/adafactor.py``) takes torch ``mean``s and a ``norm``, whose summation orders
depend on the device, the vector width and the thread count, and torch's vectorized CPU square root is not
correctly rounded in every build; a GPU kernel cannot reproduce those bits. This module *defines* the step's
arithmetic so that a kernel can: the Triton kernel (``triton_adafactor``) and the transcription here (torch
for the matrix passes, NumPy for the row/column vectors) perform the same IEEE operations in the same order
and store the same bits on any device. ``Adafactor(fused=True)`` runs it on the CPU; CUDA runs the kernel.

For an (R, C) fp32 parameter ``p``, gradient ``g`` (widened to fp32), stored row/column means ``row``,
``col`` of the second moment and its floor ``ve`` (all fp32 unless said; ``f32`` = round to fp32):

- ``sq = g*g + eps1``; sums ``S`` are fp64: the tile's values (zero padded to a power of two) summed as a
  pairwise tree of adjacent pairs (``x[2k] + x[2k+1]``, repeated), and the tiles' sums added in order from 0.
  Row sums: tiles of ``COLS`` columns. Column sums: a tree over each chunk of ``ROWS`` rows, chunks in
  order. Whole-matrix sums (of ``p*p``, ``u*u``): per ``ROWS x COLS`` tile the tree along each row then over
  the rows, and those partial sums (row-major order) in tiles of ``VEC_TILE``. Vector means: tiles of
  ``VEC_TILE``. A mean is ``f32(S / n)`` (fp64 division).
- ``scale = max(mean(row), ve)``; ``new_row = (row * f32(mean(col) / scale)) * b2 + (1 - b2) * f32(S_row(sq) / C)``,
  ``new_col = (col * f32(mean(row) / scale)) * b2 + (1 - b2) * f32(S_col(sq) / R)`` (``b2 = f32(beta2t)``,
  ``1 - b2 = f32(1 - beta2t)``); ``new_scale = max(mean(new_row), ve)``;
  ``a = 1 / sqrt(new_row / new_scale)``, ``b = 1 / sqrt(new_col)`` (IEEE division and square root);
  stored: ``row = new_row * (mean(new_col) / new_scale)``, ``col = new_col * (mean(new_row) / new_scale)``.
- ``u = (a_i * b_j) * g``; in fp64: ``lr = max(eps2, sqrt(S(p*p) / RC)) * rel`` (``rel`` when the
  parameter scale is off), ``d = max(1, sqrt(S(u*u) / RC) / clip_threshold)``.
- ``upd = u * f32(lr / d)``; with a first moment ``m = m * f32(beta1) + f32(1 - beta1) * upd`` (stored through
  its codec) and ``upd = m``; with weight decay ``p = p - p * f32(weight_decay * lr)``; ``p = p - upd``.

It equals the reference path to float rounding (``tests/test_adafactor_kernel.py`` measures the distance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ROWS, COLS, VEC_TILE = 32, 256, 1024  # tile rows (a power of two), tile columns, vector tile


def f32(x: float) -> np.float32:
    """``x`` rounded to fp32 (round to nearest even)."""
    return np.float32(x)


@dataclass(frozen=True)
class AdafactorScalars:
    """The host-side numbers of one Adafactor factored step.

    Args:
        rel: the step before the parameter scale: ``lr``, or the relative step ``min(1e-2, 1/sqrt(step))``.
        eps1: added to ``g*g``. eps2: floor of the parameter's RMS in the step size.
        clip_threshold: the update's RMS is clipped to this. beta2t: the second moment's decay this step.
        beta1: first-moment decay, or None (no first moment). weight_decay: decoupled, scaled by ``lr``.
        scale_parameter: multiply ``rel`` by ``max(eps2, RMS(p))``. m_salt: the first moment's rounding salt.
    """

    rel: float
    eps1: float
    eps2: float
    clip_threshold: float
    beta2t: float
    beta1: float | None
    weight_decay: float
    scale_parameter: bool
    m_salt: int = 0

    def fp32(self) -> dict:
        """The element-wise constants, rounded to fp32 once on the host."""
        beta1 = 0.0 if self.beta1 is None else self.beta1
        return dict(eps1=f32(self.eps1), beta2t=f32(self.beta2t), one_minus=f32(1.0 - self.beta2t),
                    beta1=f32(beta1), one_minus_beta1=f32(1.0 - beta1))  # fmt: skip

    def hyper(self, numel: int) -> list[float]:
        """The fp64 scalars the step-size kernel reads: ``[rel, eps2, clip_threshold, weight_decay, numel]``."""
        return [float(self.rel), float(self.eps2), float(self.clip_threshold), float(self.weight_decay), float(numel)]


def pair_tree(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums along ``dim`` (a power of two long) as a tree of adjacent pairs; ``dim`` is removed."""
    while x.shape[dim] > 1:
        x = x.unflatten(dim, (x.shape[dim] // 2, 2))
        x = x.select(dim + 1, 0) + x.select(dim + 1, 1)
    return x.squeeze(dim)


def in_order(parts, start: float = 0.0) -> float:
    """fp64 sum of ``parts`` one after the other from ``start`` (IEEE double additions)."""
    total = start
    for x in parts:
        total += x
    return total


def vector_sum(x: torch.Tensor) -> float:
    """``S`` of a vector: tree sums of ``VEC_TILE``-element fp64 tiles (zero padded), added in order."""
    n = x.numel()
    tiles = max(1, -(-n // VEC_TILE))
    padded = torch.zeros(tiles * VEC_TILE, dtype=torch.float64)
    padded[:n] = x.reshape(-1).double()
    return in_order(pair_tree(padded.view(tiles, VEC_TILE), 1).tolist())


def vector_mean(x: np.ndarray) -> np.float32:
    """``f32(S(x) / n)`` of a non-empty fp32 vector."""
    return f32(vector_sum(torch.from_numpy(x)) / x.size)


def _tiles(x: torch.Tensor) -> torch.Tensor:
    """``x`` (R, C) in fp64, zero padded to whole ``ROWS x COLS`` tiles: (chunks, ROWS, tiles, COLS)."""
    R, C = x.shape
    chunks, tiles = -(-R // ROWS), -(-C // COLS)
    out = torch.zeros(chunks * ROWS, tiles * COLS, dtype=torch.float64)
    out[:R, :C] = x
    return out.view(chunks, ROWS, tiles, COLS)


def matrix_sum(x: torch.Tensor) -> float:
    """``S`` of a whole (R, C) matrix: per tile the tree along each row then over the rows; the tiles'
    partial sums (row-major) summed as a vector."""
    return vector_sum(pair_tree(pair_tree(_tiles(x), 3), 1).reshape(-1))


def line_means(sq: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """fp32 row means and column means of ``sq`` (R, C) with the fixed-order sums."""
    R, C = sq.shape
    t = _tiles(sq)
    row_parts = pair_tree(t, 3).reshape(-1, t.shape[2])[:R]  # (R, tiles)
    rows = torch.zeros(R, dtype=torch.float64)
    for k in range(row_parts.shape[1]):
        rows = rows + row_parts[:, k]
    col_parts = pair_tree(t.flatten(2), 1)[:, :C]  # (chunks, C)
    cols = torch.zeros(C, dtype=torch.float64)
    for k in range(col_parts.shape[0]):
        cols = cols + col_parts[k]
    return (rows.numpy() / C).astype(np.float32), (cols.numpy() / R).astype(np.float32)


def new_statistics(row: np.ndarray, col: np.ndarray, msq_row: np.ndarray, msq_col: np.ndarray, v_eps: float,
                   c: dict) -> tuple[np.ndarray, ...]:  # fmt: skip
    """``(a, b, stored row, stored col)`` from the old statistics and the means of ``sq`` (NumPy fp32)."""
    ve = f32(v_eps)
    old_r, old_c = vector_mean(row), vector_mean(col)
    scale = old_r if old_r > ve else ve
    new_row = (row * f32(old_c / scale)) * c["beta2t"] + c["one_minus"] * msq_row
    new_col = (col * f32(old_r / scale)) * c["beta2t"] + c["one_minus"] * msq_col
    mean_r, mean_c = vector_mean(new_row), vector_mean(new_col)
    new_scale = mean_r if mean_r > ve else ve
    one = np.float32(1.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero statistic gives inf, as in the kernel
        a = one / np.sqrt(new_row / new_scale)
        b = one / np.sqrt(new_col)
    return a, b, new_row * f32(mean_c / new_scale), new_col * f32(mean_r / new_scale)


def step_scalars(p_sq: float, u_sq: float, numel: int, hp: AdafactorScalars) -> tuple[np.float32, np.float32]:
    """fp32 ``(lr / d, weight_decay * lr)`` from the fixed-order sums of ``p*p`` and ``u*u`` (fp64)."""
    lr = float(hp.rel)
    if hp.scale_parameter:
        rms_p = math.sqrt(p_sq / numel)
        lr = (rms_p if rms_p > hp.eps2 else float(hp.eps2)) * lr
    q = math.sqrt(u_sq / numel) / float(hp.clip_threshold)
    d = q if q > 1.0 else 1.0
    return f32(lr / d), f32(float(hp.weight_decay) * lr)


def adafactor_factored_step(p: torch.Tensor, g: torch.Tensor, row: torch.Tensor, col: torch.Tensor, v_eps: float,
                            hp: AdafactorScalars, m_codec=None, state: dict | None = None) -> None:  # fmt: skip
    """One Adafactor step of the (R, C) fp32 matrix ``p`` in the fixed order above, in place (any device:
    the work is done on the CPU and written back).

    Args:
        p: contiguous fp32 (R, C) parameter. g: its gradient (fp32/bf16/fp16, p's shape).
        row, col: fp32 (R,) and (C,) row/column means of the second moment; replaced by the new ones.
        v_eps: the factored codec's floor of ``mean(row)``.
        hp: the step's host numbers (``AdafactorScalars``).
        m_codec, state: the first moment's codec and the parameter's state (``state["exp_avg"]``), when
            ``hp.beta1`` is set; None otherwise.
    """
    c = hp.fp32()
    R, C = p.shape
    p32 = p.detach().cpu()
    g32 = g.detach().cpu().float()
    sq = g32 * g32 + torch.tensor(c["eps1"])
    msq_row, msq_col = line_means(sq)
    a, b, row_out, col_out = new_statistics(row.cpu().numpy(), col.cpu().numpy(), msq_row, msq_col, v_eps, c)
    u = (torch.from_numpy(a)[:, None] * torch.from_numpy(b)[None, :]) * g32
    p_sq = matrix_sum(p32.double() * p32.double()) if hp.scale_parameter else 0.0
    u64 = u.double()
    coef, wdc = step_scalars(p_sq, matrix_sum(u64 * u64), R * C, hp)
    upd = u * torch.tensor(coef)
    if hp.beta1 is not None:
        m = m_codec.decode(state, "exp_avg", p).cpu().float()
        upd = m * torch.tensor(c["beta1"]) + torch.tensor(c["one_minus_beta1"]) * upd
        m_codec.encode(state, "exp_avg", upd.to(p.device), salt=hp.m_salt)
    new_p = p32 - p32 * torch.tensor(wdc) if hp.weight_decay else p32
    p.copy_((new_p - upd).to(p.device))
    row.copy_(torch.from_numpy(row_out).to(row.device))
    col.copy_(torch.from_numpy(col_out).to(col.device))
