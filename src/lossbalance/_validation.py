"""Shared argument checks and warning helpers, with torch-style messages."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


class LossBalanceWarning(UserWarning):
    """Warning category for degenerate numerics and skipped steps in lossbalance."""


_warned: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    """Emit ``message`` once per process for ``key`` (degenerate numerics, skipped steps)."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, LossBalanceWarning, stacklevel=stacklevel)


def reset_warnings() -> None:
    """Forget which once-only warnings were emitted (for tests and long sessions)."""
    _warned.clear()


def check_beta(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value} (expected 0 <= {name} < 1)")


def check_nonneg(name: str, value: float) -> None:
    if not 0.0 <= value:
        raise ValueError(f"Invalid {name}: {value} (expected {name} >= 0)")


def check_positive(name: str, value: float) -> None:
    if not 0.0 < value:
        raise ValueError(f"Invalid {name}: {value} (expected {name} > 0)")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {valid})")


def as_loss_list(losses: Any, *, require_grad: bool = True) -> list[Tensor]:
    """Turn a list, tuple or ordered mapping of scalar losses into a list, validating each.

    Raises ``TypeError`` for anything that is not a tensor and ``ValueError`` for an empty
    collection, a non-scalar loss, or (``require_grad``) a loss that does not require grad.
    """
    if isinstance(losses, Tensor):
        if losses.dim() == 1:
            items: list[Any] = list(losses.unbind(0))
        else:
            raise TypeError(
                "losses must be a list, tuple or mapping of scalar tensors (or a 1-D tensor), "
                f"got a tensor of shape {tuple(losses.shape)}"
            )
    elif isinstance(losses, Mapping):
        items = list(losses.values())
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        items = list(losses)
    else:
        raise TypeError(
            f"losses must be a list, tuple or mapping of scalar tensors, got {type(losses).__name__}"
        )
    if len(items) == 0:
        raise ValueError("losses is empty: expected at least one loss term")
    for i, loss in enumerate(items):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss term {i} must be a Tensor, got {type(loss).__name__}")
        if loss.numel() != 1 or loss.dim() > 1:
            raise ValueError(
                f"loss term {i} must be a scalar tensor, got shape {tuple(loss.shape)}"
            )
        if require_grad and not loss.requires_grad:
            raise ValueError(
                f"loss term {i} does not require grad: it is not connected to any parameter "
                "(was it computed under torch.no_grad() or detached?)"
            )
    return [loss.reshape(()) for loss in items]


def loss_names(losses: Any) -> list[str] | None:
    """The keys of a mapping of losses, as strings; ``None`` for a sequence."""
    if isinstance(losses, Mapping):
        return [str(k) for k in losses]
    return None


def stack_losses(losses: Any, *, require_grad: bool = True) -> Tensor:
    """Validate and stack scalar losses into a 1-D tensor of length K."""
    items = as_loss_list(losses, require_grad=require_grad)
    return torch.stack(items)
