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

# --- loss level ---

# --- gradient level ---

# --- engine entry point ---

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "GradientBalancer",
    "LossBalanceWarning",
    "LossBalancer",
    "MethodInfo",
    "__version__",
    "available_methods",
    "create",
    "get_method",
    "register",
    "term_grads",
]
