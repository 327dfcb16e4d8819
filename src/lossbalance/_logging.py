"""``lossbalance.TermLogger``: per-term losses, weights and magnitudes to CSV or TensorBoard."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import IO, Any

import torch
from torch import Tensor

from lossbalance._base import Balancer

__all__ = ["TermLogger", "mtadam_term_stats"]


class TermLogger:
    r"""Record per-term losses, weights and gradient magnitudes every N steps.

    Call :meth:`log` once per training step; every ``every``-th call (steps 0, N, 2N, ...)
    writes one row to a CSV file and/or one scalar per column to TensorBoard. Steps in
    between cost nothing (no host synchronisation). Columns, for terms named ``name``:

    - ``loss/name``: the loss values passed to :meth:`log`;
    - ``weight/name``: ``balancer.last_weights`` (loss level: d combined / dL_i; gradient
      level: the alpha_i applied to the shared gradient), or ``weights=`` given directly
      (e.g. what :func:`lossbalance.backward` returned);
    - ``magnitude/name`` and ``scale/name`` from an :class:`~lossbalance.MTAdam`
      ``optimizer`` (see :func:`mtadam_term_stats`): the term's gradient magnitude over
      the whole model, :math:`\sqrt{\sum_l n_{i,l}^2}`, and the mean over layers of the
      factor :math:`n_{a,l} / n_{i,l}` by which MTAdam rescaled it (1 for the anchor);
    - ``magnitude/name`` can also be given directly (``magnitudes=``).

    The columns are fixed by the first row written; a value that is not available yet
    (``last_weights`` before the balancer's first step) is left empty in the CSV and not
    sent to TensorBoard.

    Args:
        every: record every ``every``-th step, an integer >= 1 (default 1).
        csv: path of a CSV file to write (created with its directory; overwritten), or
            ``None``.
        tensorboard: a log directory for ``torch.utils.tensorboard.SummaryWriter`` (needs
            the ``tensorboard`` package: ``pip install tensorboard``), or ``None``.
        names: the K term names; default: the keys of a mapping of losses, else
            ``"0"``, ``"1"``, ...

    Attributes:
        records: every row written, as dicts (``"step"`` and the columns).

    Example:
        >>> import tempfile, os, torch, lossbalance
        >>> path = os.path.join(tempfile.mkdtemp(), "terms.csv")
        >>> balancer = lossbalance.Uniform(2)
        >>> w = torch.zeros(3, requires_grad=True)
        >>> with lossbalance.TermLogger(every=2, csv=path, names=["mse", "l1"]) as logger:
        ...     for step in range(3):
        ...         losses = [(w - 1).pow(2).sum(), (w + 1).abs().sum()]
        ...         _ = lossbalance.backward(losses, balancer)
        ...         _ = logger.log(losses, balancer=balancer)
        >>> print(open(path).read().strip())
        step,loss/mse,loss/l1,weight/mse,weight/l1
        0,3.0,3.0,1.0,1.0
        2,3.0,3.0,1.0,1.0
    """

    def __init__(
        self,
        every: int = 1,
        *,
        csv: str | os.PathLike[str] | None = None,
        tensorboard: str | os.PathLike[str] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (expected an integer >= 1)")
        self.every = every
        self.names = None if names is None else [str(n) for n in names]
        self.csv_path = None if csv is None else os.fspath(csv)
        self.records: list[dict[str, float]] = []
        self._calls = 0
        self._columns: list[str] | None = None
        self._file: IO[str] | None = None
        self._csv: Any = None
        self._writer: Any = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # torch raises ImportError when tensorboard is missing
                raise ImportError(
                    "TermLogger(tensorboard=...) needs the tensorboard package: "
                    "pip install tensorboard (or pip install 'lossbalance[tensorboard]')"
                ) from err
            self._writer = SummaryWriter(log_dir=os.fspath(tensorboard))

    def log(
        self,
        losses: Sequence[Tensor | float] | Mapping[str, Tensor | float] | Tensor | None = None,
        *,
        balancer: Balancer | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        weights: Tensor | Sequence[float] | None = None,
        magnitudes: Tensor | Sequence[float] | None = None,
        step: int | None = None,
    ) -> bool:
        """Record this step if it is a multiple of ``every``.

        Args:
            losses: the K loss values (tensors or floats; list, tuple, mapping or 1-D
                tensor).
            balancer: a balancer whose ``last_weights`` are logged as the weights.
            optimizer: an :class:`~lossbalance.MTAdam` whose magnitudes are logged.
            weights: the weights, given directly (instead of ``balancer``).
            magnitudes: per-term magnitudes, given directly (instead of ``optimizer``).
            step: the step number; default: the number of earlier calls.

        Returns:
            Whether a row was written.
        """
        if step is None:
            step = self._calls
        self._calls += 1
        if step % self.every != 0:
            return False
        if balancer is not None and weights is not None:
            raise ValueError("TermLogger.log takes balancer= or weights=, not both")
        if optimizer is not None and magnitudes is not None:
            raise ValueError("TermLogger.log takes optimizer= or magnitudes=, not both")
        groups: dict[str, list[float] | None] = {}
        names = self.names
        if losses is not None:
            if names is None and isinstance(losses, Mapping):
                names = [str(key) for key in losses]
            groups["loss"] = _floats(losses, "losses")
        if balancer is not None:
            last = balancer.last_weights
            groups["weight"] = None if last is None else _floats(last, "weights")
        elif weights is not None:
            groups["weight"] = _floats(weights, "weights")
        if optimizer is not None:
            stats = mtadam_term_stats(optimizer)
            groups["magnitude"] = None if stats is None else stats[0]
            groups["scale"] = None if stats is None else stats[1]
        elif magnitudes is not None:
            groups["magnitude"] = _floats(magnitudes, "magnitudes")
        row = self._row(int(step), groups, names)
        self._write(row)
        return True

    def _row(
        self, step: int, groups: dict[str, list[float] | None], names: list[str] | None
    ) -> dict[str, float]:
        sizes = {len(v) for v in groups.values() if v is not None}
        if len(sizes) > 1:
            raise ValueError(
                "TermLogger.log: the number of terms disagrees between "
                + ", ".join(f"{key} ({len(v)})" for key, v in groups.items() if v is not None)
            )
        k = sizes.pop() if sizes else (len(names) if names is not None else 0)
        if names is None:
            names = [str(i) for i in range(k)]
        elif len(names) != k and sizes:
            raise ValueError(f"TermLogger has {len(names)} names but the step has {k} terms")
        if self.names is None and names:
            self.names = names
        row: dict[str, float] = {}
        for key, values in groups.items():
            for i, name in enumerate(names):
                row[f"{key}/{name}"] = math.nan if values is None else values[i]
        if self._columns is None:
            self._columns = list(row)
        elif set(row) - set(self._columns):
            extra = sorted(set(row) - set(self._columns))
            raise ValueError(
                f"TermLogger.log got new columns {extra} after the first row fixed the "
                f"columns {self._columns}: pass the same sources (balancer, optimizer, ...) "
                "on every logged step"
            )
        return {"step": step, **{c: row.get(c, math.nan) for c in self._columns}}

    def _write(self, row: dict[str, float]) -> None:
        self.records.append(row)
        step = int(row["step"])
        if self.csv_path is not None:
            if self._file is None:
                folder = os.path.dirname(self.csv_path)
                if folder:
                    os.makedirs(folder, exist_ok=True)
                self._file = open(self.csv_path, "w", newline="")  # closed by close()
                self._csv = csv.writer(self._file)
                self._csv.writerow(list(row))
            self._csv.writerow(
                [step] + ["" if math.isnan(v) else repr(v) for k, v in row.items() if k != "step"]
            )
            self._file.flush()
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and not math.isnan(value):
                    self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        """Flush the CSV file and the TensorBoard writer."""
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the CSV file and the TensorBoard writer (further rows reopen nothing)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self.csv_path = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TermLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TermLogger(every={self.every}, csv={self.csv_path!r}, rows={len(self.records)})"


def mtadam_term_stats(optimizer: torch.optim.Optimizer) -> tuple[list[float], list[float]] | None:
    r"""Per-term summaries of an MTAdam's magnitude EMAs :math:`n_{i,l}`.

    Returns ``(magnitude, scale)``, two lists of K floats: the term's magnitude over the
    whole model :math:`\sqrt{\sum_l n_{i,l}^2}` (its gradient norm, smoothed), and the
    mean over layers of :math:`n_{0,l} / n_{i,l}`, the factor by which MTAdam scaled the
    term towards the anchor (layers where :math:`n_{i,l} = 0` are left out). ``None``
    before the first step.
    """
    magnitudes = getattr(optimizer, "magnitudes", None)
    if magnitudes is None:
        raise TypeError(
            f"optimizer must be an MTAdam (it has magnitudes()), got {type(optimizer).__name__}"
        )
    mags = list(magnitudes().values())
    if not mags:
        return None
    stacked = torch.stack([m.detach().to(torch.float64).cpu() for m in mags])  # (layers, K)
    magnitude = stacked.square().sum(0).sqrt()
    positive = stacked > 0
    ratio = torch.where(positive, stacked[:, :1] / stacked.where(positive, 1.0), 0.0)
    count = positive.sum(0).clamp(min=1)
    scale = ratio.sum(0) / count
    return magnitude.tolist(), scale.tolist()


def _floats(values: Any, what: str) -> list[float]:
    if isinstance(values, Tensor):
        if values.dim() > 1:
            raise ValueError(f"TermLogger: {what} must be 1-D, got shape {tuple(values.shape)}")
        return [float(v) for v in values.detach().to(torch.float64).cpu().reshape(-1)]
    if isinstance(values, Mapping):
        values = list(values.values())
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"TermLogger: {what} must be a sequence, mapping or 1-D tensor, got "
            f"{type(values).__name__}"
        )
    return [float(v.detach()) if isinstance(v, Tensor) else float(v) for v in values]
