"""Pure functions behind the balancers.

Gradient-level functions take the K x P matrix ``G`` of per-term gradients (rows are
terms) and return weights ``alpha`` of shape ``(K,)`` (or, for :func:`pcgrad`, the
combined gradient); loss-level functions take the 1-D tensor of K losses. None of them
touches ``.grad`` or keeps state.
"""

from __future__ import annotations

from lossbalance._aligned_mtl import aligned_mtl_weights, aligned_mtl_weights_from_gramian
from lossbalance._cagrad import cagrad_weights, cagrad_weights_from_gramian
from lossbalance._config import config_weights, config_weights_from_gramian
from lossbalance._fairgrad import fairgrad_weights, fairgrad_weights_from_gramian
from lossbalance._gradnorm import (
    grad_normalization_weights,
    grad_normalization_weights_from_gramian,
    gradnorm_weights,
    gradnorm_weights_from_gramian,
)
from lossbalance._imtl import imtl_g_weights, imtl_g_weights_from_gramian, imtl_l_loss
from lossbalance._mgda import (
    mgda_closed_form_weights,
    mgda_closed_form_weights_from_gramian,
    mgda_weights,
    mgda_weights_from_gramian,
)
from lossbalance._mtadam import mtadam
from lossbalance._nash_mtl import nash_mtl_weights, nash_mtl_weights_from_gramian
from lossbalance._pcgrad import pcgrad, pcgrad_weights, pcgrad_weights_from_gramian
from lossbalance._upgrad import (
    dualproj_weights,
    dualproj_weights_from_gramian,
    upgrad_weights,
    upgrad_weights_from_gramian,
)

__all__ = [
    "aligned_mtl_weights",
    "aligned_mtl_weights_from_gramian",
    "cagrad_weights",
    "cagrad_weights_from_gramian",
    "config_weights",
    "config_weights_from_gramian",
    "dualproj_weights",
    "dualproj_weights_from_gramian",
    "fairgrad_weights",
    "fairgrad_weights_from_gramian",
    "grad_normalization_weights",
    "grad_normalization_weights_from_gramian",
    "gradnorm_weights",
    "gradnorm_weights_from_gramian",
    "imtl_g_weights",
    "imtl_g_weights_from_gramian",
    "imtl_l_loss",
    "mgda_closed_form_weights",
    "mgda_closed_form_weights_from_gramian",
    "mgda_weights",
    "mgda_weights_from_gramian",
    "mtadam",
    "nash_mtl_weights",
    "nash_mtl_weights_from_gramian",
    "pcgrad",
    "pcgrad_weights",
    "pcgrad_weights_from_gramian",
    "upgrad_weights",
    "upgrad_weights_from_gramian",
]
