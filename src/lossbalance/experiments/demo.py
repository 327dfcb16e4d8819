"""The demo: ten weighted per-class terms on the bundled 8x8 digits, on a CPU in a minute.

The MTAdam paper's MNIST experiment in miniature, with no data files: 1797 bundled 8x8
digits (75% train, 25% test, stratified, fixed split), a small MLP, ten per-class terms
L_i = w_i * (sum of the NLL of the batch's class-i samples) / B with w_i ~ U(1, 1000)
drawn per seed. Rows: Adam on unit weights (Balanced-Adam), Adam, MTAdam, uncertainty
weighting (loss level) and IMTL-G (gradient level) on the weighted terms; any other method
through ``methods``; with ``ablation`` MTAdam and the five variants of the MTAdam paper's
Table 5. The table shows the accuracy after epoch 5 beside the last, and sentences
computed from the run's own numbers say what it shows.
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

__all__ = ["DEFAULT_METHODS", "DemoConfig", "lessons", "method_names", "run"]

#: balanced and unbalanced Adam, MTAdam, one loss-level and one gradient-level balancer
DEFAULT_METHODS = ["balanced-adam", "adam", "mtadam", "uncertainty", "imtl-g"]
#: the epoch of the table's early column: MTAdam's head start shows there
EARLY_EPOCH = 5


@dataclass
class DemoConfig(ExperimentConfig):
    """Settings of ``lossbalance demo``.

    Attributes (besides :class:`~lossbalance.experiments.harness.ExperimentConfig`):
        hidden: width of the MLP's hidden layer.
        weight_scheme: ``"paper"`` (w_i ~ U(1, 1000)) or ``"authors"``.
        ablation: run MTAdam and its five Table 5 variants (when ``methods`` is None).
    """

    seeds: int = 3
    epochs: int = 40
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
        f"8x8 digits (UCI, bundled; {task.num_train} train / {config['test_size']} test), "
        f"MLP 64-{cfg.hidden}-10, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}.",
        "Terms: L_i = w_i * sum of class-i NLL / batch size, w_i ~ U(1, 1000) drawn per seed "
        "(Balanced rows: all w_i = 1). A batch without class i gives L_i = 0 with no "
        "gradient, which some balancers warn about once (uncertainty weighting, IMTL-G): expected here.",
    ]
    return class_terms_result(
        "demo",
        "Demo: ten weighted per-class terms on the 8x8 digits",
        config,
        specs,
        seeds,
        runs,
        notes=notes,
        early_epoch=EARLY_EPOCH if cfg.epochs > EARLY_EPOCH else None,
        lessons=partial(lessons, epochs=cfg.epochs),
    )


def lessons(
    final: Mapping[str, Mapping[str, Any]], early: Mapping[str, Mapping[str, Any]], *, epochs: int
) -> list[str]:
    """Two or three sentences on what the demo's table shows, from its own numbers.

    They compare the rows the default command trains (balanced and unbalanced Adam,
    MTAdam, the balancers); a row that was not run is left out of the sentences."""

    def acc(table: Mapping[str, Mapping[str, Any]], row: str) -> float | None:
        value = table.get(row, {}).get("mean")
        return value if isinstance(value, float) and value == value else None

    said = []
    balanced, adam, mtadam = (
        acc(final, r) for r in ("Balanced-Adam", "Unbalanced-Adam", "Unbalanced-MTAdam")
    )
    if balanced is not None and adam is not None:
        said.append(
            f"Weighting the ten per-class terms by w_i ~ U(1, 1000) costs Adam "
            f"{balanced - adam:.1f} points of test accuracy after {epochs} epochs "
            f"({adam:.1f}% against {balanced:.1f}% with unit weights)."
        )
    early_m, early_a = acc(early, "Unbalanced-MTAdam"), acc(early, "Unbalanced-Adam")
    if mtadam is not None and early_m is not None and early_a is not None:
        verdict = "ahead of" if early_m > early_a else "behind"
        said.append(
            f"MTAdam, on the same weighted terms, is {verdict} unbalanced Adam after "
            f"{EARLY_EPOCH} epochs ({early_m:.1f}% against {early_a:.1f}%) and ends at "
            f"{mtadam:.1f}%"
            + (
                f", {abs(balanced - mtadam):.1f} points "
                f"{'below' if mtadam < balanced else 'above'} balanced Adam."
                if balanced is not None
                else "."
            )
        )
    others = {
        row: value
        for row in final
        if row.startswith("Unbalanced-")
        and row not in ("Unbalanced-Adam", "Unbalanced-MTAdam")
        and (value := acc(final, row)) is not None
    }
    if others and adam is not None:
        best = max(others, key=others.__getitem__)
        ends = ", ".join(
            f"{row.removeprefix('Unbalanced-')} {value:.1f}%" for row, value in others.items()
        )
        if others[best] > adam and balanced is not None and balanced > adam:
            gained = 100 * (others[best] - adam) / (balanced - adam)
            verdict = (
                f"{best.removeprefix('Unbalanced-')} wins back {gained:.0f}% of the points "
                "the weights cost"
            )
        else:
            verdict = "none of them does better than unbalanced Adam here"
        said.append(
            f"The balancers, each with Adam on its balanced gradient, end at {ends}: {verdict}."
        )
    return said
