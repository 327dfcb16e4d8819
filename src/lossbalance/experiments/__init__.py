"""Experiments of the ``lossbalance`` command line: data, models, harness, reports.

- :mod:`~lossbalance.experiments.demo`: ten weighted per-class terms on the 8x8 digits.
- :mod:`~lossbalance.experiments.mnist`: the MTAdam paper's Table 1 (and Table 5).
- :mod:`~lossbalance.experiments.multimnist`: the IMTL paper's Table 1 protocol, small.

Each experiment module has a config dataclass and ``run(config) -> ExperimentResult``;
:func:`~lossbalance.experiments.report.write_report` writes summary.json, results.json,
results.md and the plots. The harness owns the training loop; the methods know nothing
of epochs, loaders, devices or files. Needs the ``cli`` extra (tqdm, matplotlib) for progress
bars and plots; the demo's digits ship with the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lossbalance.experiments.harness import (
        ExperimentConfig,
        TrainConfig,
        run_experiment,
        train_run,
    )
    from lossbalance.experiments.methods import MethodSpec, resolve_methods
    from lossbalance.experiments.report import ExperimentResult, write_report

__all__ = [
    "ExperimentConfig",
    "ExperimentResult",
    "MethodSpec",
    "TrainConfig",
    "resolve_methods",
    "run_experiment",
    "train_run",
    "write_report",
]

# resolved on first use (PEP 562), so that importing a torch-free submodule (methods) does
# not import the harness and torch
_EXPORTS = {
    "ExperimentConfig": "lossbalance.experiments.harness",
    "TrainConfig": "lossbalance.experiments.harness",
    "run_experiment": "lossbalance.experiments.harness",
    "train_run": "lossbalance.experiments.harness",
    "MethodSpec": "lossbalance.experiments.methods",
    "resolve_methods": "lossbalance.experiments.methods",
    "ExperimentResult": "lossbalance.experiments.report",
    "write_report": "lossbalance.experiments.report",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
