"""Pure functions behind the balancers.

Gradient-level functions take the K x P matrix ``G`` of per-term gradients (rows are
terms) and return weights ``alpha`` of shape ``(K,)`` (or, for :func:`pcgrad`, the
combined gradient); loss-level functions take the 1-D tensor of K losses. None of them
touches ``.grad`` or keeps state.
"""

from __future__ import annotations

from lossbalance.methods._aligned_mtl import aligned_mtl_weights, aligned_mtl_weights_from_gramian
from lossbalance.methods._cagrad import cagrad_weights, cagrad_weights_from_gramian
from lossbalance.methods._config import config_weights, config_weights_from_gramian
from lossbalance.methods._dbmtl import db_mtl_step
from lossbalance.methods._encodec import encodec_weights, encodec_weights_from_gramian
from lossbalance.methods._excess_mtl import excess_mtl_update, excess_risks
from lossbalance.methods._fairgrad import fairgrad_weights, fairgrad_weights_from_gramian
from lossbalance.methods._famo import famo_logit_grad, famo_loss
from lossbalance.methods._graddrop import graddrop
from lossbalance.methods._gradnorm import (
    grad_normalization_weights,
    grad_normalization_weights_from_gramian,
    gradnorm_weights,
    gradnorm_weights_from_gramian,
)
from lossbalance.methods._gradvac import gradvac_weights, gradvac_weights_from_gramian
from lossbalance.methods._imtl import imtl_g_weights, imtl_g_weights_from_gramian, imtl_l_loss
from lossbalance.methods._metabalance import metabalance_coefficients
from lossbalance.methods._mgda import (
    mgda_closed_form_weights,
    mgda_closed_form_weights_from_gramian,
    mgda_weights,
    mgda_weights_from_gramian,
)
from lossbalance.methods._moco import moco_step
from lossbalance.methods._modo import modo_step
from lossbalance.methods._nash_mtl import nash_mtl_weights, nash_mtl_weights_from_gramian
from lossbalance.methods._pcgrad import pcgrad, pcgrad_weights, pcgrad_weights_from_gramian
from lossbalance.methods._rlw import rlw_weights
from lossbalance.methods._sdmgrad import sdmgrad_step
from lossbalance.methods._stch import stch_loss
from lossbalance.methods._upgrad import (
    dualproj_weights,
    dualproj_weights_from_gramian,
    upgrad_weights,
    upgrad_weights_from_gramian,
)
from lossbalance.methods._vector import project_simplex
from lossbalance.optim._mtadam import mtadam

__all__ = [
    "aligned_mtl_weights",
    "aligned_mtl_weights_from_gramian",
    "cagrad_weights",
    "cagrad_weights_from_gramian",
    "config_weights",
    "config_weights_from_gramian",
    "db_mtl_step",
    "dualproj_weights",
    "dualproj_weights_from_gramian",
    "encodec_weights",
    "encodec_weights_from_gramian",
    "excess_mtl_update",
    "excess_risks",
    "fairgrad_weights",
    "fairgrad_weights_from_gramian",
    "famo_logit_grad",
    "famo_loss",
    "grad_normalization_weights",
    "grad_normalization_weights_from_gramian",
    "graddrop",
    "gradnorm_weights",
    "gradnorm_weights_from_gramian",
    "gradvac_weights",
    "gradvac_weights_from_gramian",
    "imtl_g_weights",
    "imtl_g_weights_from_gramian",
    "imtl_l_loss",
    "metabalance_coefficients",
    "mgda_closed_form_weights",
    "mgda_closed_form_weights_from_gramian",
    "mgda_weights",
    "mgda_weights_from_gramian",
    "moco_step",
    "modo_step",
    "mtadam",
    "nash_mtl_weights",
    "nash_mtl_weights_from_gramian",
    "pcgrad",
    "pcgrad_weights",
    "pcgrad_weights_from_gramian",
    "project_simplex",
    "rlw_weights",
    "sdmgrad_step",
    "stch_loss",
    "upgrad_weights",
    "upgrad_weights_from_gramian",
]
