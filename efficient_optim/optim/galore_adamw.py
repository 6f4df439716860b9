"""GaLoreAdamW: the GaLore rule (``optim.galore``) as an optimizer of its own (registry name ``galore``)."""

from __future__ import annotations

from ..policy.policies import Policy
from .lowrank_adam import LowRankAdam


class GaLoreAdamW(LowRankAdam):
    """AdamW inside a periodically refreshed rank-r subspace of each weight matrix (GaLore, Zhao et al. 2024).

    The gradient of each large matrix is projected onto its top-``rank`` singular directions (randomized SVD,
    refreshed every ``svd_freq`` steps), Adam's moments live in the projected space, and the direction is
    projected back and scaled by ``galore_scale``; on a refresh the moments are rotated into the new basis
    (``optim.galore``). Vectors, small tensors and matrices whose rank would exceed ``max_rank_fraction`` of
    their short side keep dense fp32 moments (exact AdamW). The same numbers as
    ``LowRankAdam(update_strategy="periodic")``, with GaLore's options only.

    Args:
        params: parameters, ``named_parameters()`` or param groups.
        lr, betas, eps, weight_decay: AdamW's (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2).
        rank: rank r of the projection (default 16).
        svd_freq: steps between projection refreshes (default None: 50).
        galore_scale: scale alpha of the projected-back update (default 1.0; the GaLore paper uses 0.25).
        oversample, power_iters: randomized SVD settings (defaults 8 and 2).
        min_lowrank_numel: tensors with fewer elements keep dense moments (default 4096).
        max_rank_fraction: matrices with ``rank > max_rank_fraction * min(m, n)`` keep dense moments (default 0.5).
        lowrank: False keeps a group's parameters dense (default True).
        seed: seed of the SVDs' random test matrices (default 0).
        nonfinite, maximize, correction_bits, weight_rounding, policy: as for every optimizer of the library.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, rank: int = 16, svd_freq: int | None = None, galore_scale: float = 1.0,
                 oversample: int = 8, power_iters: int = 2, min_lowrank_numel: int = 4096,
                 max_rank_fraction: float = 0.5, lowrank: bool = True, seed: int = 0, nonfinite: str = "skip",
                 maximize: bool = False, correction_bits: int | None = None, weight_rounding: str = "auto",
                 policy: Policy | None = None):  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, svd_freq=svd_freq, update_strategy="periodic",
                         oversample=oversample, power_iters=power_iters, min_lowrank_numel=min_lowrank_numel,
                         max_rank_fraction=max_rank_fraction, lowrank=lowrank, galore_scale=galore_scale, seed=seed,
                         nonfinite=nonfinite, maximize=maximize, correction_bits=correction_bits,
                         weight_rounding=weight_rounding, policy=policy)  # fmt: skip

    def validate_group(self, group: dict) -> None:
        if group.get("update_strategy", "periodic") != "periodic":
            raise ValueError(f"GaLoreAdamW: update_strategy={group['update_strategy']!r}: GaLore's rule is 'periodic' "
                             "(use LowRankAdam for the other strategies)")  # fmt: skip
        super().validate_group(group)
