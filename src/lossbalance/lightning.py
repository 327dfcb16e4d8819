"""PyTorch Lightning integration: a ``training_step`` that returns the loss terms.

Lightning's automatic optimization calls ``loss.backward()`` on the one loss that
``training_step`` returns, then ``optimizer.step(closure)``. A balancer needs the terms
instead. :class:`MultiTermModule` (a ``LightningModule``) lets ``training_step`` return
them, and its ``backward`` hands them on:

- to MTAdam (``configure_optimizers`` returns a :class:`lossbalance.MTAdam`):
  ``opt.accumulate(terms)``, then Lightning's ``opt.step(closure)`` applies them;
- to a balancer (``self.balancer``, with any torch optimizer):
  ``lossbalance.backward(terms, self.balancer, **options)``, which writes ``.grad``.

With ``Trainer(accumulate_grad_batches=N)`` each micro-batch's terms are divided by N, as
Lightning divides the loss. Under ``precision="16-mixed"`` the balancer path scales the
terms with Lightning's ``GradScaler``. In manual optimization ``self.optimizers().step(losses)``
works with MTAdam, and ``lossbalance.backward`` replaces ``manual_backward``.

Lightning is imported on the first use of ``MultiTermModule``: neither ``import
lossbalance`` nor ``import lossbalance.lightning`` needs it. :class:`MultiTermMixin` is the
same behaviour as a mixin, for a ``LightningModule`` base class of your own (list the mixin
first: ``class Module(MultiTermMixin, MyLightningModule)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lossbalance._base import Balancer
from lossbalance._validation import as_loss_list
from lossbalance.engine._backward import backward as balance_backward
from lossbalance.optim._mtadam import MTAdam

# MultiTermModule is built on first access (module __getattr__ below)
__all__ = ["MultiTermMixin", "MultiTermModule", "Terms"]  # noqa: F822

_PENDING = "_lossbalance_pending"
_WRAPPED = "_lossbalance_returns_terms"


@dataclass(frozen=True, init=False, eq=False)
class Terms:
    """Loss terms returned by ``training_step``, with options for ``lossbalance.backward``.

    ``return Terms(losses, shared=self.trunk, features=z)`` in a :class:`MultiTermModule`
    that has a ``self.balancer``; ``options`` are the keyword arguments of
    :func:`lossbalance.backward` (``shared``, ``features``, ``mode``, ``process_group``,
    ``retain_graph``). A plain list, tuple or mapping of terms is ``Terms(losses)``.
    """

    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor
    options: dict[str, Any]

    def __init__(self, losses: Any, **options: Any) -> None:
        object.__setattr__(self, "losses", losses)
        object.__setattr__(self, "options", options)


class MultiTermMixin:
    """``training_step`` may return the loss terms; ``backward`` balances them.

    In automatic optimization, a ``training_step`` that returns a list, tuple or mapping
    of scalar loss tensors (anchor first for MTAdam), a 1-D tensor of them, or
    :class:`Terms` has them balanced: with MTAdam as the optimizer, by MTAdam (options are
    not allowed); otherwise by ``self.balancer`` through :func:`lossbalance.backward`.
    Lightning sees ``{"loss": sum of the terms}`` (detached, for its logs and callbacks).
    A tensor or a dict with a ``"loss"`` key is Lightning's usual one loss and is
    back-propagated as usual (a mapping of terms must therefore not name one ``"loss"``).

    In manual optimization, ``training_step`` returns what it likes and
    ``self.optimizers().step(losses)`` calls ``MTAdam.step(losses)`` through Lightning
    (which counts the step).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        shadowing = [
            base.__qualname__
            for base in cls.__mro__[: cls.__mro__.index(MultiTermMixin)]
            if base.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
            and "backward" in vars(base)
        ]
        if shadowing:
            raise TypeError(
                f"{cls.__qualname__}: list MultiTermMixin before {shadowing[0]} in the bases "
                f"(class {cls.__name__}(MultiTermMixin, LightningModule)), otherwise "
                "Lightning's backward runs instead of the balancing one"
            )
        step = vars(cls).get("training_step")
        if step is not None and not getattr(step, _WRAPPED, False):
            cls.training_step = _returning_terms(step)  # type: ignore[attr-defined]

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Balance the terms ``training_step`` returned (Lightning calls this hook)."""
        pending = self.__dict__.pop(_PENDING, None)
        if pending is None:
            super().backward(loss, *args, **kwargs)  # type: ignore[misc]
            return
        trainer: Any = self.trainer  # type: ignore[attr-defined]
        items, options = pending
        micro = trainer.accumulate_grad_batches
        if micro > 1:
            items = [loss / micro for loss in items]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, MTAdam):
            if options:
                raise TypeError(
                    f"training_step returned Terms with options {sorted(options)}: they are "
                    "for lossbalance.backward (self.balancer); with MTAdam return the terms "
                    "alone"
                )
            if trainer.gradient_clip_val:
                # Lightning would clip the .grad that MTAdam never reads: a silent no-op
                raise RuntimeError(
                    f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips .grad, which "
                    "MTAdam does not read: leave it unset and clip with "
                    "MTAdam(max_grad_norm=...)"
                )
            if scaler is not None:
                raise RuntimeError(
                    "MTAdam under Lightning's precision='16-mixed': its GradScaler steps from "
                    ".grad, which MTAdam does not use. Use precision='bf16-mixed', or "
                    "'32-true' with torch.autocast in training_step and manual optimization: "
                    "self.optimizers().step(losses, grad_scaler=scaler); scaler.update()"
                )
            optimizer.accumulate(items)
            return
        balancer = getattr(self, "balancer", None)
        if not isinstance(balancer, Balancer):
            raise TypeError(
                "training_step returned loss terms but the optimizer is "
                f"{type(optimizer).__name__} and self.balancer is {type(balancer).__name__}: "
                "set self.balancer = lossbalance.create(name, num_terms) in __init__, or "
                "return lossbalance.MTAdam(...) from configure_optimizers"
            )
        if scaler is not None:
            options = {"grad_scaler": scaler, **options}
        balance_backward(items, balancer, **options)

    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        """Lightning's optimizers; an MTAdam one's ``step`` also takes the loss terms."""
        opts = super().optimizers(use_pl_optimizer)  # type: ignore[misc]
        for opt in opts if isinstance(opts, list) else [opts]:
            if isinstance(getattr(opt, "optimizer", None), MTAdam):
                _accept_terms(opt)
        return opts


def _returning_terms(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = step(self, *args, **kwargs)
        self.__dict__.pop(_PENDING, None)
        if not self.automatic_optimization or out is None or _is_one_loss(out):
            return out
        if isinstance(out, Terms):
            losses, options = out.losses, out.options
        elif isinstance(out, (Sequence, Mapping, Tensor)) and not isinstance(out, str):
            losses, options = out, {}
        else:
            raise TypeError(
                f"training_step returned a {type(out).__name__}: expected the loss terms (a "
                "list, tuple or mapping of scalar tensors, or lossbalance.lightning.Terms), "
                "one loss tensor, a dict with a 'loss' key, or None"
            )
        items = as_loss_list(losses)
        self.__dict__[_PENDING] = (items, options)
        return {"loss": sum(loss.detach() for loss in items)}

    setattr(training_step, _WRAPPED, True)
    return training_step


def _is_one_loss(out: Any) -> bool:
    return (isinstance(out, Tensor) and out.dim() == 0) or (
        isinstance(out, Mapping) and "loss" in out
    )


def _accept_terms(opt: Any) -> None:
    # LightningOptimizer.step(closure) rejects a list as a closure; this subclass of the
    # instance's class (Lightning builds one per optimizer) passes it on as the losses
    base = type(opt)
    if getattr(base, _WRAPPED, False):
        return

    def step(self: Any, losses: Any = None, closure: Any = None, **kwargs: Any) -> Any:
        if callable(losses) and closure is None:
            losses, closure = None, losses
        if losses is not None:
            kwargs["losses"] = losses
        return base.step(self, closure, **kwargs)

    opt.__class__ = type(base.__name__, (base,), {"step": step, _WRAPPED: True})


def __getattr__(name: str) -> Any:
    # MultiTermModule subclasses lightning's LightningModule: built on first use, so that
    # importing this module (and collecting its doctests) does not need Lightning
    if name == "MultiTermModule":
        try:
            import lightning.pytorch as pl
        except ImportError as err:
            raise ImportError(
                "lossbalance.lightning.MultiTermModule needs PyTorch Lightning: "
                "pip install lightning (or the lossbalance[lightning] extra)"
            ) from err

        module = type(
            "MultiTermModule",
            (MultiTermMixin, pl.LightningModule),
            {"__module__": __name__, "__doc__": MultiTermMixin.__doc__},
        )
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
