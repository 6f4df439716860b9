"""A memory budget written as plain settings: what optimizer specs and ``create_optimizer`` accept.

``create_optimizer("qadamw", model, budget_bpp=1.5, allocator="dynamic")`` and the spec
``qadamw+budget_bpp=1.5+allocator=dynamic`` (``effopt bench --optimizers``, ``effopt suite``) build the
optimizer with ``policy=Budget(bytes_per_param=1.5, allocator="dynamic")``. The settings:

- ``budget_bpp``: the budget in bytes of optimizer state per parameter element (``Budget(bytes_per_param=)``);
- ``budget_bytes``: the budget in bytes (``Budget(bytes=)``); give exactly one of the two;
- ``allocator``: ``fixed``, ``data`` (default) or ``dynamic``;
- ``warmup``, ``every``, ``patience``: as ``Budget`` takes them (steps before the first measurement, steps
  between re-plans of the dynamic allocator, re-plans that must agree before a state changes codec).

The last four need one of the first two: without a budget they would be silently ignored, so they are refused.
"""

from __future__ import annotations

from .budget import Budget

BUDGET_SIZE_KEYS = ("budget_bpp", "budget_bytes")
BUDGET_SETTING_KEYS = ("allocator", "warmup", "every", "patience")
BUDGET_KEYS = BUDGET_SIZE_KEYS + BUDGET_SETTING_KEYS
ALLOCATOR_NAMES = ("fixed", "data", "dynamic")


def has_budget_options(kwargs: dict) -> bool:
    """Whether ``kwargs`` holds any budget setting (``BUDGET_KEYS``)."""
    return any(k in kwargs for k in BUDGET_KEYS)


def _positive_int(key: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {key}={value!r}: an integer >= 1")
    return value


def budget_from_options(options: dict) -> Budget:
    """The ``Budget`` the settings in ``options`` describe (only ``BUDGET_KEYS`` are read).

    Args:
        options: ``budget_bpp`` or ``budget_bytes``, and optionally ``allocator``, ``warmup``, ``every``,
            ``patience`` (values as a spec parses them: numbers or strings).

    Raises:
        ValueError: no budget, both sizes, or a value that is not what its key takes (the message names it).
    """
    sizes = [k for k in BUDGET_SIZE_KEYS if k in options]
    if not sizes:
        given = ", ".join(k for k in BUDGET_SETTING_KEYS if k in options)
        raise ValueError(f"{given} set without a budget: add budget_bpp=<bytes per parameter> or budget_bytes=<bytes>")
    if len(sizes) == 2:
        raise ValueError("give one budget: budget_bpp (bytes per parameter) or budget_bytes, not both")
    key, value = sizes[0], options[sizes[0]]
    if key == "budget_bpp":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"invalid budget_bpp={value!r}: a number of bytes per parameter > 0 (fp32 AdamW holds 8)")
        size = {"bytes_per_param": float(value)}
    else:
        size = {"bytes": _positive_int("budget_bytes", value)}
    allocator = options.get("allocator", "data")
    if allocator not in ALLOCATOR_NAMES:
        raise ValueError(f"invalid allocator={allocator!r}: choose {', '.join(ALLOCATOR_NAMES)}")
    settings = {k: _positive_int(k, options[k]) for k in ("warmup", "every", "patience") if k in options}
    return Budget(**size, allocator=allocator, **settings)


def split_budget(kwargs: dict) -> tuple[dict, Budget | None]:
    """``(the other keyword arguments, the Budget)`` from an optimizer's keyword arguments.

    Args:
        kwargs: keyword arguments for ``create_optimizer`` (not changed).

    Returns ``(kwargs, None)`` when there are no budget settings; ``ValueError`` as ``budget_from_options``.
    """
    if not has_budget_options(kwargs):
        return dict(kwargs), None
    rest = {k: v for k, v in kwargs.items() if k not in BUDGET_KEYS}
    return rest, budget_from_options({k: v for k, v in kwargs.items() if k in BUDGET_KEYS})
