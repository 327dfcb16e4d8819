"""The demo: ten weighted per-class terms on scikit-learn's 8x8 digits, on a CPU in a minute.

The MTAdam paper's MNIST experiment in miniature, with no data files: 1797 bundled 8x8
digits (75% train, 25% test, stratified, fixed split), a small MLP, ten per-class terms
L_i = w_i * (sum of the NLL of the batch's class-i samples) / B with w_i ~ U(1, 1000)
drawn per seed. Rows: Adam on unit weights (Balanced-Adam), Adam and MTAdam on the
weighted terms; any other method through ``methods``; with ``ablation`` MTAdam and the
five variants of the MTAdam paper's Table 5.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from lossbalance.experiments.data import load_digits_data
from lossbalance.experiments.harness import ExperimentConfig, run_experiment
from lossbalance.experiments.methods import ABLATIONS, resolve_methods
from lossbalance.experiments.mnist import class_terms_result, expand_methods
from lossbalance.experiments.models import DigitsMLP
from lossbalance.experiments.report import ExperimentResult
from lossbalance.experiments.tasks import ClassTermsTask

__all__ = ["DEFAULT_METHODS", "DemoConfig", "method_names", "run"]

DEFAULT_METHODS = ["balanced-adam", "adam", "mtadam"]


@dataclass
class DemoConfig(ExperimentConfig):
    """Settings of ``lossbalance demo``.

    Attributes (besides :class:`~lossbalance.experiments.harness.ExperimentConfig`):
        hidden: width of the MLP's hidden layer.
        weight_scheme: ``"paper"`` (w_i ~ U(1, 1000)) or ``"authors"``.
        ablation: run MTAdam and its five Table 5 variants (when ``methods`` is None).
    """

    seeds: int = 5
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    evals_per_epoch: int = 1
    threads: int | None = 1
    hidden: int = 64
    weight_scheme: str = "paper"
    ablation: bool = False


def method_names(cfg: DemoConfig) -> list[str]:
    """The row names that ``cfg`` asks for (its methods, or the experiment's default rows)."""
    return expand_methods(cfg.methods, list(ABLATIONS) if cfg.ablation else DEFAULT_METHODS)


def run(
    cfg: DemoConfig,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Run the demo and return its results (nothing is written)."""
    cfg.validate()
    specs = resolve_methods(method_names(cfg), weighted=True)
    data = load_digits_data().limit(cfg.train_limit, cfg.test_limit)
    task = ClassTermsTask(
        "digits",
        data,
        partial(DigitsMLP, 64, cfg.hidden),
        (64,),
        weight_scheme=cfg.weight_scheme,
    )
    train_cfg = cfg.train_config()
    seeds = cfg.seed_list()
    runs = run_experiment([(None, task)], specs, seeds, train_cfg, previous=previous, on_run=on_run)
    config = {**asdict(cfg), "device": str(train_cfg.device), "train_size": task.num_train}
    config["test_size"] = int(data.test_y.shape[0])
    config["methods"] = [s.name for s in specs]
    notes = [
        f"scikit-learn 8x8 digits ({task.num_train} train / {config['test_size']} test), "
        f"MLP 64-{cfg.hidden}-10, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}.",
        "Terms: L_i = w_i * sum of class-i NLL / batch size, w_i ~ U(1, 1000) drawn per seed "
        "(Balanced rows: all w_i = 1).",
    ]
    return class_terms_result(
        "demo",
        "Demo: ten weighted per-class terms on the 8x8 digits",
        config,
        specs,
        seeds,
        runs,
        notes=notes,
    )
