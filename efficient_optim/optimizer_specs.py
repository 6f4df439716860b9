"""Optimizer specs: a registry name with settings in one string, ``qadamw4+m_map=softsign+rounding=stochastic``.

The benchmark commands take optimizers in this form (``effopt bench --optimizers``), and the analyses that
configure an optimizer from a string (``analysis.decomposition``) parse it here, so that neither has to import
the other. Values are parsed as int, float, bool (``true``/``false``) or left as strings.
"""

from __future__ import annotations


def parse_value(text: str):
    """``"16"`` -> 16, ``"1e-3"`` -> 0.001, ``"true"`` -> True, anything else stays a string.

    Args:
        text: one setting's value as written in a spec.
    """
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"qadamw4+m_map=softsign"`` -> ``("qadamw4", {"m_map": "softsign"})``.

    Args:
        spec: ``name[+key=value...]``.

    Raises:
        ValueError: an empty name, or a setting that is not ``key=value`` (the message names the spec).
    """
    name, *pairs = spec.strip().split("+")
    if not name:
        raise ValueError(f"empty optimizer name in spec {spec!r}")
    kwargs = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"optimizer spec {spec!r}: setting {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        kwargs[key] = parse_value(value)
    return name, kwargs
