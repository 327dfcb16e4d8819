"""Test configuration: device and dtype are switched by environment variables.

``LOSSBALANCE_TEST_DEVICE`` (default ``cpu``) and ``LOSSBALANCE_TEST_DTYPE`` (default
``float64``) let the same suite run on a GPU or in float32.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
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


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def write_idx() -> Callable[[Path, np.ndarray], None]:
    """Write a uint8 array as a gzipped idx file (tiny synthetic MNIST-format data)."""
    return _write_idx
