"""Method names of the experiments: torch optimizers, MTAdam variants and registry balancers.

A row of a results table is a :class:`MethodSpec`. Names come from three places:

- the plain torch optimizers trained on the (weighted) sum of the terms: ``sgd-m``
  (SGD with momentum 0.9), ``rmsprop``, ``adam``;
- MTAdam and the five ablations of the MTAdam paper's Table 5 (``mtadam-no-normalization``
  and so on, see :data:`MTADAM_VARIANTS`);
- every balancer in the registry (``lossbalance.available_methods()``), trained with Adam
  through :func:`lossbalance.backward`.

In experiments whose terms carry random weights (``mnist``, ``demo``) a name may be
prefixed with ``balanced-`` (all term weights 1) or ``unbalanced-`` (the default), and the
row label says which: ``balanced-adam`` is the row "Balanced-Adam".
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lossbalance._registry import available_methods, get_method

__all__ = [
    "ABLATIONS",
    "LABELS",
    "MTADAM_VARIANTS",
    "OPTIMIZERS",
    "MethodSpec",
    "canonical_row",
    "method_names",
    "registry_balancers",
    "resolve_method",
    "resolve_methods",
]

Kind = Literal["optimizer", "mtadam", "registry-optimizer", "balancer"]

#: plain torch optimizers on the summed terms: name -> row label
OPTIMIZERS: dict[str, str] = {"sgd-m": "SGD-M", "rmsprop": "RMSProp", "adam": "Adam"}

#: MTAdam and its Table 5 ablations: name -> (row label, MTAdam keyword arguments)
MTADAM_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mtadam": ("MTAdam", {}),
    "mtadam-no-normalization": ("MTAdam (i) no normalization", {"normalization": "none"}),
    "mtadam-global-magnitude": ("MTAdam (ii) one global magnitude", {"grouping": "global"}),
    "mtadam-unit-magnitude": ("MTAdam (iii) own magnitude, no anchor", {"normalization": "unit"}),
    "mtadam-own-second-moment": (
        "MTAdam (iv) own second moment",
        {"second_moment": "own"},
    ),
    "mtadam-mean-second-moment": (
        "MTAdam (v) mean of second moments",
        {"second_moment": "mean"},
    ),
}

ABLATIONS = tuple(MTADAM_VARIANTS)

#: row labels of the registry's methods, spelled as their papers spell them. Every label
#: lower-cased is the registry name, so a label is also a valid ``--methods`` name. A
#: method registered elsewhere and missing here is labelled by its registry name.
LABELS: dict[str, str] = {
    "aligned-mtl": "Aligned-MTL",
    "cagrad": "CAGrad",
    "config": "ConFIG",
    "db-mtl": "DB-MTL",
    "dualproj": "DualProj",
    "dwa": "DWA",
    "dynamic": "Dynamic",
    "encodec": "EnCodec",
    "excess-mtl": "Excess-MTL",
    "fairgrad": "FairGrad",
    "famo": "FAMO",
    "fixed": "Fixed",
    "gls": "GLS",
    "grad-normalization": "Grad-Normalization",
    "graddrop": "GradDrop",
    "gradnorm": "GradNorm",
    "gradvac": "GradVac",
    "imtl": "IMTL",
    "imtl-g": "IMTL-G",
    "imtl-l": "IMTL-L",
    "initial-loss": "Initial-Loss",
    "metabalance": "MetaBalance",
    "mgda": "MGDA",
    "mgda-closed-form": "MGDA-Closed-Form",
    "moco": "MoCo",
    "modo": "MoDo",
    "mtadam": "MTAdam",
    "nash-mtl": "Nash-MTL",
    "pcgrad": "PCGrad",
    "rlw": "RLW",
    "sdmgrad": "SDMGrad",
    "stch": "STCH",
    "uncertainty": "Uncertainty",
    "uniform": "Uniform",
    "upgrad": "UPGrad",
}


@dataclass(frozen=True)
class MethodSpec:
    """One row of an experiment.

    Attributes:
        name: canonical name, e.g. ``"balanced-adam"`` or ``"imtl-hybrid"``.
        label: row label in tables and JSON, e.g. ``"Balanced-Adam"``.
        kind: ``"optimizer"`` (torch optimizer on the summed terms), ``"mtadam"``
            (``lossbalance.MTAdam`` on the list of terms), ``"registry-optimizer"``
            (another optimizer-level method from the registry) or ``"balancer"``
            (a registry balancer with Adam via ``lossbalance.backward``).
        base: the optimizer or registry name without prefix.
        balanced: train on unit term weights instead of the experiment's random ones.
        options: keyword arguments for MTAdam or the balancer's constructor.
    """

    name: str
    label: str
    kind: Kind
    base: str
    balanced: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


def _registry_names() -> list[str]:
    return [
        n
        for n in available_methods()
        if n not in OPTIMIZERS and n not in MTADAM_VARIANTS and _buildable(n)
    ]


def method_names() -> list[str]:
    """Every name ``--methods`` accepts (without the ``balanced-`` prefix)."""
    return [*OPTIMIZERS, *MTADAM_VARIANTS, *_registry_names()]


def _unknown(name: str, weighted: bool) -> ValueError:
    valid = ", ".join(method_names())
    hint = " (prefix any with 'balanced-' to use unit term weights)" if weighted else ""
    return ValueError(f"Unknown method {name!r}. Valid methods: {valid}{hint}")


def resolve_method(name: str, *, weighted: bool) -> MethodSpec:
    """Parse one ``--methods`` name into a :class:`MethodSpec`.

    Args:
        name: e.g. ``"adam"``, ``"Balanced-Adam"``, ``"mtadam-global-magnitude"``,
            ``"imtl-g"``. Case and ``_`` versus ``-`` do not matter.
        weighted: whether the experiment's terms carry random weights (then labels get a
            ``Balanced-``/``Unbalanced-`` prefix and ``balanced-`` is allowed).

    Raises:
        ValueError: an unknown name (the message lists the valid ones), or a
            ``balanced-`` prefix in an experiment without term weights.
    """
    key = name.strip().lower().replace("_", "-")
    balanced = False
    prefixed = False
    for prefix, value in (("balanced-", True), ("unbalanced-", False)):
        if key.startswith(prefix):
            key, balanced, prefixed = key[len(prefix) :], value, True
            break
    if prefixed and not weighted:
        raise ValueError(
            f"Invalid method {name!r}: the 'balanced-'/'unbalanced-' prefixes apply only to "
            "experiments with weighted terms (mnist, demo)"
        )
    kind: Kind
    options: dict[str, Any] = {}
    if key in OPTIMIZERS:
        kind, base_label = "optimizer", OPTIMIZERS[key]
    elif key in MTADAM_VARIANTS:
        kind = "mtadam"
        base_label, options = MTADAM_VARIANTS[key]
    else:
        try:
            info = get_method(key)
        except ValueError:
            raise _unknown(name, weighted) from None
        key = info.name
        if not _buildable(key):
            raise ValueError(
                f"Invalid method {name!r}: its constructor needs arguments besides num_terms, "
                "which the experiments cannot supply"
            )
        kind = "registry-optimizer" if info.needs == "optimizer" else "balancer"
        base_label = LABELS.get(info.name, info.name)
    if weighted:
        label = ("Balanced-" if balanced else "Unbalanced-") + base_label
        canonical = ("balanced-" if balanced else "") + key
    else:
        label, canonical = base_label, key
    return MethodSpec(canonical, label, kind, key, balanced, dict(options))


def canonical_row(row: str) -> str:
    """A recorded row label in the current scheme (:data:`LABELS`).

    Runs recorded before the labels followed the papers' spellings carry the registry name
    (``"Unbalanced-imtl-g"``, ``"nash-mtl [mnist]"``); ``--resume`` and ``--report-only``
    read them under the current label, so that old and new records form one row. Labels
    that are not a registry name (``"Adam"``, the MTAdam ablations) are returned as given.
    """
    head, sep, group = row.partition(" [")
    prefix = ""
    for p in ("Balanced-", "Unbalanced-"):
        if head.startswith(p):
            prefix, head = p, head[len(p) :]
            break
    label = LABELS.get(head)
    if label is None:
        return row
    return f"{prefix}{label}{sep}{group}"


def resolve_methods(names: Iterable[str], *, weighted: bool) -> list[MethodSpec]:
    """Resolve names (each may hold several, comma-separated); duplicates are dropped."""
    specs: list[MethodSpec] = []
    seen: set[str] = set()
    for item in names:
        for part in item.split(","):
            if not part.strip():
                continue
            spec = resolve_method(part, weighted=weighted)
            if spec.name not in seen:
                seen.add(spec.name)
                specs.append(spec)
    if not specs:
        raise ValueError("no methods given")
    return specs


def _buildable(name: str) -> bool:
    # A factory with required arguments besides num_terms (``fixed`` needs its weights)
    # cannot be a default row: the CLI has no way to pass them.
    try:
        params = list(inspect.signature(get_method(name).factory).parameters.values())
    except (TypeError, ValueError):
        return True
    required = [
        p
        for p in params[1:]
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return not required


def registry_balancers() -> list[str]:
    """Registry balancers (not optimizer-level) that can be built from ``num_terms`` alone."""
    return [n for n in _registry_names() if get_method(n).needs != "optimizer" and _buildable(n)]
