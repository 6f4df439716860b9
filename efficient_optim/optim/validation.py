"""Hyperparameter checks shared by the optimizers: a wrong value is a ``ValueError`` naming it."""

from __future__ import annotations

import math
from numbers import Real


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def check_nonneg(name: str, value) -> None:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid {name}: {value!r} (must be a finite number >= 0)")


def check_positive(name: str, value) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid {name}: {value!r} (must be a finite number > 0)")


def check_beta(name: str, value) -> None:
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"invalid {name}: {value!r} (must be in [0, 1))")


def check_betas(value) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"invalid betas: {value!r} (must be a pair (beta1, beta2))")
    check_beta("beta1 (betas[0])", value[0])
    check_beta("beta2 (betas[1])", value[1])


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"invalid {name}: {value!r} (choose one of {list(choices)})")


def check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"invalid {name}: {value!r} (must be an integer >= {minimum})")
