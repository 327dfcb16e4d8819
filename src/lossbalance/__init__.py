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
    "term_grads": "lossbalance.engine._engine",
    "MethodInfo": "lossbalance._registry",
    "available_methods": "lossbalance._registry",
    "create": "lossbalance._registry",
    "get_method": "lossbalance._registry",
    "register": "lossbalance._registry",
    "LossBalanceWarning": "lossbalance._validation",
    "MTAdam": "lossbalance.optim._mtadam",
    "DWA": "lossbalance.methods._dwa",
    "FAMO": "lossbalance.methods._famo",
    "GLS": "lossbalance.methods._gls",
    "DynamicNormalization": "lossbalance.methods._normalization",
    "InitialLossNormalization": "lossbalance.methods._normalization",
    "RandomLossWeighting": "lossbalance.methods._rlw",
    "STCH": "lossbalance.methods._stch",
    "UncertaintyWeighting": "lossbalance.methods._uncertainty",
    "FixedWeights": "lossbalance.methods._uniform",
    "Uniform": "lossbalance.methods._uniform",
    "AlignedMTL": "lossbalance.methods._aligned_mtl",
    "CAGrad": "lossbalance.methods._cagrad",
    "ConFIG": "lossbalance.methods._config",
    "DBMTL": "lossbalance.methods._dbmtl",
    "EnCodecBalancer": "lossbalance.methods._encodec",
    "ExcessMTL": "lossbalance.methods._excess_mtl",
    "FairGrad": "lossbalance.methods._fairgrad",
    "GradDrop": "lossbalance.methods._graddrop",
    "GradNorm": "lossbalance.methods._gradnorm",
    "GradNormalization": "lossbalance.methods._gradnorm",
    "GradVac": "lossbalance.methods._gradvac",
    "IMTL": "lossbalance.methods._imtl",
    "IMTLG": "lossbalance.methods._imtl",
    "IMTLL": "lossbalance.methods._imtl",
    "MetaBalance": "lossbalance.methods._metabalance",
    "MGDA": "lossbalance.methods._mgda",
    "MGDAClosedForm": "lossbalance.methods._mgda",
    "MoCo": "lossbalance.methods._moco",
    "MoDo": "lossbalance.methods._modo",
    "NashMTL": "lossbalance.methods._nash_mtl",
    "PCGrad": "lossbalance.methods._pcgrad",
    "SDMGrad": "lossbalance.methods._sdmgrad",
    "DualProj": "lossbalance.methods._upgrad",
    "UPGrad": "lossbalance.methods._upgrad",
    "VectorBalancer": "lossbalance.methods._vector",
    "cross_gramian": "lossbalance.methods._vector",
    "backward": "lossbalance.engine._backward",
    "term_gramian": "lossbalance.engine._engine",
    "Accumulator": "lossbalance.engine._accumulator",
    "TermLogger": "lossbalance._logging",
}

if TYPE_CHECKING:
    from lossbalance._base import Balancer, GradientBalancer, LossBalancer
    from lossbalance._registry import (
        MethodInfo,
        available_methods,
        create,
        get_method,
        register,
    )
    from lossbalance._validation import LossBalanceWarning
    from lossbalance.engine._engine import term_grads

    # --- optimizer level (MTAdam) ---
    # isort: split
    from lossbalance.optim._mtadam import MTAdam

    # --- loss level ---
    # isort: split
    from lossbalance.methods._dwa import DWA
    from lossbalance.methods._famo import FAMO
    from lossbalance.methods._gls import GLS
    from lossbalance.methods._normalization import DynamicNormalization, InitialLossNormalization
    from lossbalance.methods._rlw import RandomLossWeighting
    from lossbalance.methods._stch import STCH
    from lossbalance.methods._uncertainty import UncertaintyWeighting
    from lossbalance.methods._uniform import FixedWeights, Uniform

    # --- gradient level ---
    # isort: split
    from lossbalance.methods._aligned_mtl import AlignedMTL
    from lossbalance.methods._cagrad import CAGrad
    from lossbalance.methods._config import ConFIG
    from lossbalance.methods._dbmtl import DBMTL
    from lossbalance.methods._encodec import EnCodecBalancer
    from lossbalance.methods._excess_mtl import ExcessMTL
    from lossbalance.methods._fairgrad import FairGrad
    from lossbalance.methods._graddrop import GradDrop
    from lossbalance.methods._gradnorm import GradNorm, GradNormalization
    from lossbalance.methods._gradvac import GradVac
    from lossbalance.methods._imtl import IMTL, IMTLG, IMTLL
    from lossbalance.methods._metabalance import MetaBalance
    from lossbalance.methods._mgda import MGDA, MGDAClosedForm
    from lossbalance.methods._moco import MoCo
    from lossbalance.methods._modo import MoDo
    from lossbalance.methods._nash_mtl import NashMTL
    from lossbalance.methods._pcgrad import PCGrad
    from lossbalance.methods._sdmgrad import SDMGrad
    from lossbalance.methods._upgrad import DualProj, UPGrad
    from lossbalance.methods._vector import VectorBalancer, cross_gramian

    # --- engine entry point ---
    # isort: split
    from lossbalance.engine._backward import backward
    from lossbalance.engine._engine import term_gramian

    # --- integration (DDP, AMP, logging) ---
    # isort: split
    from lossbalance._logging import TermLogger
    from lossbalance.engine._accumulator import Accumulator


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
