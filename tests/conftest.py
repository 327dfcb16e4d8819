"""Test configuration: device and dtype are switched by environment variables.

``LOSSBALANCE_TEST_DEVICE`` (default ``cpu``) and ``LOSSBALANCE_TEST_DTYPE`` (default
``float64``) let the same suite run on a GPU or in float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lossbalance._validation as _validation

DEVICE = torch.device(os.environ.get("LOSSBALANCE_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("LOSSBALANCE_TEST_DTYPE", "float64"))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def dtype() -> torch.dtype:
    return DTYPE


@pytest.fixture(autouse=True)
def _fresh_warnings():
    # once-only warnings must be observable in every test
    _validation.reset_warnings()
    yield
    _validation.reset_warnings()
