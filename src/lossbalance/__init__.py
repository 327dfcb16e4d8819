"""lossbalance: automatic balancing of multi-term losses in PyTorch.

MTAdam (Malkiel & Wolf 2020) balances the terms inside the optimizer; the balancers
(uncertainty weighting, GradNorm, MGDA, PCGrad, IMTL, ...) balance them for any torch
optimizer through :func:`lossbalance.backward`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the private module that defines it. The package imports a module on the
# first use of one of its names (PEP 562), so that `import lossbalance` and the command
# line's `--help` do not import torch; `_import_all()` imports every module (the registry
# does, since each method module registers itself). The imports under TYPE_CHECKING are
# the same table for type checkers and IDEs (tests/test_lazy_import.py holds them equal).
_EXPORTS: dict[str, str] = {
    "Balancer": "lossbalance._base",
    "GradientBalancer": "lossbalance._base",
    "LossBalancer": "lossbalance._base",
    "term_grads": "lossbalance._engine",
    "MethodInfo": "lossbalance._registry",
    "available_methods": "lossbalance._registry",
    "create": "lossbalance._registry",
    "get_method": "lossbalance._registry",
    "register": "lossbalance._registry",
    "LossBalanceWarning": "lossbalance._validation",
    "MTAdam": "lossbalance._mtadam",
    "DWA": "lossbalance._dwa",
    "FAMO": "lossbalance._famo",
    "GLS": "lossbalance._gls",
    "DynamicNormalization": "lossbalance._normalization",
    "InitialLossNormalization": "lossbalance._normalization",
    "RandomLossWeighting": "lossbalance._rlw",
    "STCH": "lossbalance._stch",
    "UncertaintyWeighting": "lossbalance._uncertainty",
    "FixedWeights": "lossbalance._uniform",
    "Uniform": "lossbalance._uniform",
    "AlignedMTL": "lossbalance._aligned_mtl",
    "CAGrad": "lossbalance._cagrad",
    "ConFIG": "lossbalance._config",
    "DBMTL": "lossbalance._dbmtl",
    "EnCodecBalancer": "lossbalance._encodec",
    "ExcessMTL": "lossbalance._excess_mtl",
    "FairGrad": "lossbalance._fairgrad",
    "GradDrop": "lossbalance._graddrop",
    "GradNorm": "lossbalance._gradnorm",
    "GradNormalization": "lossbalance._gradnorm",
    "GradVac": "lossbalance._gradvac",
    "IMTL": "lossbalance._imtl",
    "IMTLG": "lossbalance._imtl",
    "IMTLL": "lossbalance._imtl",
    "MetaBalance": "lossbalance._metabalance",
    "MGDA": "lossbalance._mgda",
    "MGDAClosedForm": "lossbalance._mgda",
    "MoCo": "lossbalance._moco",
    "MoDo": "lossbalance._modo",
    "NashMTL": "lossbalance._nash_mtl",
    "PCGrad": "lossbalance._pcgrad",
    "SDMGrad": "lossbalance._sdmgrad",
    "DualProj": "lossbalance._upgrad",
    "UPGrad": "lossbalance._upgrad",
    "VectorBalancer": "lossbalance._vector",
    "cross_gramian": "lossbalance._vector",
    "backward": "lossbalance._backward",
    "term_gramian": "lossbalance._engine",
    "Accumulator": "lossbalance._accumulator",
    "TermLogger": "lossbalance._logging",
}

if TYPE_CHECKING:
    from lossbalance._base import Balancer, GradientBalancer, LossBalancer
    from lossbalance._engine import term_grads
    from lossbalance._registry import (
        MethodInfo,
        available_methods,
        create,
        get_method,
        register,
    )
    from lossbalance._validation import LossBalanceWarning

    # --- optimizer level (MTAdam) ---
    # isort: split
    from lossbalance._mtadam import MTAdam

    # --- loss level ---
    # isort: split
    from lossbalance._dwa import DWA
    from lossbalance._famo import FAMO
    from lossbalance._gls import GLS
    from lossbalance._normalization import DynamicNormalization, InitialLossNormalization
    from lossbalance._rlw import RandomLossWeighting
    from lossbalance._stch import STCH
    from lossbalance._uncertainty import UncertaintyWeighting
    from lossbalance._uniform import FixedWeights, Uniform

    # --- gradient level ---
    # isort: split
    from lossbalance._aligned_mtl import AlignedMTL
    from lossbalance._cagrad import CAGrad
    from lossbalance._config import ConFIG
    from lossbalance._dbmtl import DBMTL
    from lossbalance._encodec import EnCodecBalancer
    from lossbalance._excess_mtl import ExcessMTL
    from lossbalance._fairgrad import FairGrad
    from lossbalance._graddrop import GradDrop
    from lossbalance._gradnorm import GradNorm, GradNormalization
    from lossbalance._gradvac import GradVac
    from lossbalance._imtl import IMTL, IMTLG, IMTLL
    from lossbalance._metabalance import MetaBalance
    from lossbalance._mgda import MGDA, MGDAClosedForm
    from lossbalance._moco import MoCo
    from lossbalance._modo import MoDo
    from lossbalance._nash_mtl import NashMTL
    from lossbalance._pcgrad import PCGrad
    from lossbalance._sdmgrad import SDMGrad
    from lossbalance._upgrad import DualProj, UPGrad
    from lossbalance._vector import VectorBalancer, cross_gramian

    # --- engine entry point ---
    # isort: split
    from lossbalance._backward import backward
    from lossbalance._engine import term_gramian

    # --- integration (DDP, AMP, logging) ---
    # isort: split
    from lossbalance._accumulator import Accumulator
    from lossbalance._logging import TermLogger


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lossbalance' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def _import_all() -> None:
    """Import every module behind the public names (this registers every method)."""
    for module in dict.fromkeys(_EXPORTS.values()):
        importlib.import_module(module)


__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "STCH",
    "Accumulator",
    "AlignedMTL",
    "Balancer",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "DynamicNormalization",
    "EnCodecBalancer",
    "ExcessMTL",
    "FairGrad",
    "FixedWeights",
    "GradDrop",
    "GradNorm",
    "GradNormalization",
    "GradVac",
    "GradientBalancer",
    "InitialLossNormalization",
    "LossBalanceWarning",
    "LossBalancer",
    "MGDAClosedForm",
    "MTAdam",
    "MetaBalance",
    "MethodInfo",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "RandomLossWeighting",
    "SDMGrad",
    "TermLogger",
    "UPGrad",
    "UncertaintyWeighting",
    "Uniform",
    "VectorBalancer",
    "__version__",
    "available_methods",
    "backward",
    "create",
    "cross_gramian",
    "get_method",
    "register",
    "term_grads",
    "term_gramian",
]
