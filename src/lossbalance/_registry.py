"""Name registry of balancing methods: one source for the CLI, ``create`` and the docs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Needs = Literal["losses", "grads", "gramian", "optimizer"]


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows of one method.

    Attributes:
        name: registry key, lower case with dashes (``"imtl-g"``).
        factory: called as ``factory(num_terms, **kwargs)``; returns a balancer, or for
            ``needs == "optimizer"`` an optimizer class to be called with ``params``.
        needs: ``"losses"`` (loss values only), ``"grads"`` (per-term gradients),
            ``"gramian"`` (only their K x K Gramian) or ``"optimizer"`` (MTAdam).
        stateful: whether the method keeps state across steps (learnable or running).
        paper: reference, e.g. ``"Liu et al., ICLR 2021"``.
        summary: one line for ``lossbalance list``.
    """

    name: str
    factory: Callable[..., Any]
    needs: Needs
    stateful: bool
    paper: str
    summary: str


_REGISTRY: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    """Add a method to the registry (a name may be registered once)."""
    if info.name in _REGISTRY:
        raise ValueError(f"method {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodInfo:
    """Look a method up by name; an unknown name raises ``ValueError`` listing valid ones."""
    _load_builtin()
    key = name.strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"Unknown method {name!r}. Valid methods: {valid}")
    return _REGISTRY[key]


def create(name: str, num_terms: int, **kwargs: Any) -> Any:
    """Build the balancer registered as ``name`` for ``num_terms`` loss terms."""
    return get_method(name).factory(num_terms, **kwargs)


def _load_builtin() -> None:
    # Importing the method modules registers every built-in method (each registers itself);
    # the package imports them lazily, so ask for all of them.
    import lossbalance

    lossbalance._import_all()
