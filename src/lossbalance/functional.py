"""Pure functions behind the balancers.

Gradient-level functions take the K x P matrix ``G`` of per-term gradients (rows are
terms) and return weights ``alpha`` of shape ``(K,)`` (or, for :func:`pcgrad`, the
combined gradient); loss-level functions take the 1-D tensor of K losses. None of them
touches ``.grad`` or keeps state.
"""

from __future__ import annotations

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
from lossbalance._pcgrad import pcgrad, pcgrad_weights, pcgrad_weights_from_gramian

__all__ = [
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
    "pcgrad",
    "pcgrad_weights",
    "pcgrad_weights_from_gramian",
]
