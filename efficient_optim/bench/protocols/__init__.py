"""Research protocols as plug-ins: one module per protocol, found by this package's registry.

A protocol is one file in this folder that defines ``PROTOCOL``, an instance of a ``base.Protocol`` subclass
(its runs, verdicts and report sections; see ``base``). ``protocols()`` imports every module here once and
registers what they define; nothing has to import them by hand, and ``effopt suite NAME`` finds a protocol by
its name or an alias (its protocol id: ``p1``, ``p7``, ...). Protocols defined elsewhere (a user's package)
join with ``register_protocol``.

    from efficient_optim.bench.protocols import get_protocol
    get_protocol("p1").title        # 'Baselines (P1)'

Add a protocol: copy the smallest one here (``weight_splitting.py``), give it a ``name`` that says what it
does, its id as an alias, a ``plan`` and ``verdicts``; ``effopt suite --list`` shows it.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import INDICATIVE, MET, NOT_MEASURABLE, NOT_MET, Protocol, Verdict, indicative, verdict_markdown  # noqa: F401

_REGISTRY: dict[str, Protocol] = {}  # name -> protocol
_ALIASES: dict[str, str] = {}  # alias -> name
_DISCOVERED = False
_NOT_PROTOCOLS = {"base"}


def register_protocol(protocol: Protocol) -> Protocol:
    """Add ``protocol`` under its ``name`` and aliases (a later registration of the same name replaces it).

    ``ValueError`` when it has no name, or a name or alias already belongs to another protocol.
    """
    if not isinstance(protocol, Protocol) or not protocol.name:
        raise ValueError(f"a protocol must be a bench.protocols.Protocol with a name, got {protocol!r}")
    for n in protocol.names:
        owner = _ALIASES.get(n, n if n in _REGISTRY else None)
        if owner is not None and owner != protocol.name:
            raise ValueError(f"protocol name {n!r} of {protocol.name!r} already belongs to protocol {owner!r}")
    _REGISTRY[protocol.name] = protocol
    for alias in protocol.aliases:
        _ALIASES[alias] = protocol.name
    return protocol


def _discover() -> None:
    """Import every module of this package once and register its ``PROTOCOL``."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _NOT_PROTOCOLS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        protocol = getattr(module, "PROTOCOL", None)
        if protocol is not None:
            register_protocol(protocol)


def _order(p: Protocol) -> tuple:
    digits = "".join(ch for ch in p.protocol_id if ch.isdigit())
    return (not digits, int(digits) if digits else 0, p.name)


def protocols() -> list[Protocol]:
    """Every registered protocol: those with a protocol id first (P1, P7, ...), then by name."""
    _discover()
    return sorted(_REGISTRY.values(), key=_order)


def get_protocol(name: str) -> Protocol | None:
    """The protocol called ``name`` (its name or an alias, case-insensitive), or ``None``."""
    _discover()
    key = name.strip().lower()
    return _REGISTRY.get(_ALIASES.get(key, key))
