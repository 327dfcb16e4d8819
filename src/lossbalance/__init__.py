"""lossbalance: automatic balancing of multi-term losses in PyTorch.

MTAdam (Malkiel & Wolf 2020) balances the terms inside the optimizer; the balancers
(uncertainty weighting, GradNorm, MGDA, PCGrad, IMTL, ...) balance them for any torch
optimizer through :func:`lossbalance.backward`.
"""

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

__version__ = "0.1.0"

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
