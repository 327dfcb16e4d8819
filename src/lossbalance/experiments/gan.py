"""The training loop and the shared plumbing of the adversarial experiments (pix2pix, SRGAN,
CycleGAN).

Each step of a run:

1. the generator maps the batch (``fake = task.generate(G, batch)``);
2. the discriminator takes one Adam step on ``task.discriminator_loss(D, batch, fake)``
   (``fake`` detached), always with Adam, whatever the row;
3. the generator's K terms ``L_i = lambda_i * task.generator_terms(...)[i]`` (the
   discriminator frozen) go to the row's optimizer: SGD-momentum, RMSProp or Adam on
   their sum, MTAdam on the list (term 0, the reconstruction term, is its anchor), or a
   registry balancer via :func:`lossbalance.backward` then Adam.

This is pix2pix's order (``optimize_parameters``: update D, then G against the updated
D). The run records have the fields of :func:`lossbalance.experiments.harness.train_run`
(so the report writers, plots and ``--resume`` work unchanged), plus the discriminator
loss in the trace, the mean training losses (unweighted terms, ``train_<term>``, and
``train_d``) since the previous evaluation in each ``history`` entry, and a few test
outputs of the final generator (``samples``) for the grid of samples.

An experiment module keeps its task, networks, weights, notes and table columns; its
``run`` is :meth:`GanSetup.load` (settings, rows, data, feature classifiers), the task,
:meth:`GanSetup.train` and :meth:`GanSetup.result`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossbalance.experiments.data import ClassificationData, load_idx_dataset
from lossbalance.experiments.harness import (
    ExperimentConfig,
    Stepper,
    TrainConfig,
    _bar,
    _floats,
    make_stepper,
    resolve_device,
    run_all,
    seed_everything,
    train_loop,
)
from lossbalance.experiments.methods import ABLATIONS, MethodSpec, resolve_methods
from lossbalance.experiments.mnist import expand_methods
from lossbalance.experiments.report import (
    ExperimentResult,
    cost_cells,
    cost_headers,
    encode_images,
    format_mean_std,
    markdown_table,
    protocol_note,
    seeds_note,
    summarize,
    timing_note,
)
from lossbalance.experiments.synthesis import (
    ClassifierConfig,
    FashionClassifier,
    default_cache_dir,
    load_or_train_classifier,
)

__all__ = [
    "DEFAULT_METHODS",
    "AdversarialTask",
    "GanConfig",
    "GanSetup",
    "GanTask",
    "GanTrainConfig",
    "bce_gan_loss",
    "evaluating",
    "gan_result",
    "make_generator_stepper",
    "method_names",
    "run_gan_experiment",
    "train_gan_run",
]

#: a table column: (metric key, header, decimals)
Column = tuple[str, str, int]

#: the rows of every adversarial experiment: Balanced-Adam and the four unbalanced ones
DEFAULT_METHODS = ["balanced-adam", "sgd-m", "rmsprop", "adam", "mtadam"]


def bce_gan_loss(logits: Tensor, real: bool) -> Tensor:
    """The vanilla GAN loss: binary cross-entropy of the logits against "real" or "fake"."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


class GanTask(Protocol):
    """What the adversarial loop needs of an experiment.

    ``generator_terms`` returns the K unweighted terms; the loop multiplies them by the
    row's weights (``term_weights``). ``samples`` returns uint8 images ``(S, H, W)``: the
    generator's outputs for the task's fixed sample inputs; ``sample_references`` the
    grid's first rows (``(label, encoded images)``: the inputs, the targets).
    """

    name: str
    term_names: list[str]
    metric: str
    num_train: int

    def to(self, device: torch.device) -> None: ...

    def build_generator(self) -> nn.Module: ...

    def build_discriminator(self) -> nn.Module: ...

    def term_weights(self, balanced: bool) -> Tensor: ...

    def train_batch(self, index: Tensor) -> Any: ...

    def generate(self, generator: nn.Module, batch: Any) -> Any: ...

    def discriminator_loss(self, discriminator: nn.Module, batch: Any, fake: Any) -> Tensor: ...

    def generator_terms(
        self, generator: nn.Module, discriminator: nn.Module, batch: Any, fake: Any
    ) -> list[Tensor]: ...

    def evaluate(self, generator: nn.Module, batch_size: int = 500) -> dict[str, float]: ...

    def samples(self, generator: nn.Module) -> np.ndarray: ...

    def sample_references(self) -> list[tuple[str, dict[str, Any]]]: ...


class AdversarialTask:
    """The bookkeeping that the adversarial tasks share (a base for a :class:`GanTask`).

    A subclass sets ``name`` and ``metric``, lists in ``tensors`` the attributes that hold
    tensors and in ``movable`` those moved in place by their own ``to(device)``
    (evaluators), and calls ``super().__init__``.

    Args:
        term_names: the K generator terms, in order.
        weights: ``(balanced, unbalanced)`` term weights.
        num_train: training examples (batches index them).
    """

    name: str
    metric: str
    #: attributes holding tensors: :meth:`to` replaces them by their copies on the device
    tensors: ClassVar[tuple[str, ...]] = ()
    #: attributes that :meth:`to` moves with their own ``to(device)``
    movable: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        term_names: Sequence[str],
        weights: tuple[tuple[float, ...], tuple[float, ...]],
        num_train: int,
    ) -> None:
        self.term_names = list(term_names)
        self.weights = weights
        self.num_train = num_train

    def to(self, device: torch.device) -> None:
        for name in self.tensors:
            setattr(self, name, getattr(self, name).to(device))
        for name in self.movable:
            getattr(self, name).to(device)

    def term_weights(self, balanced: bool) -> Tensor:
        return torch.tensor(self.weights[0] if balanced else self.weights[1])


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode and without gradients for the block, then back in the mode
    it had."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


@dataclass
class GanTrainConfig(TrainConfig):
    """:class:`~lossbalance.experiments.harness.TrainConfig` plus the GAN settings.

    Attributes:
        beta1: first-moment decay of Adam and MTAdam (generator and discriminator); the
            second is 0.999 and MTAdam's magnitude decay beta3 0.9.
        d_lr: the discriminator's learning rate (``None``: ``lr``).
    """

    beta1: float = 0.5
    d_lr: float | None = None


@dataclass
class GanConfig(ExperimentConfig):
    """Settings common to the adversarial experiments.

    Attributes (besides :class:`~lossbalance.experiments.harness.ExperimentConfig`):
        beta1: Adam's and MTAdam's beta1, for the generator and the discriminator.
        d_lr: the discriminator's learning rate (``None``: ``lr``).
        data_dir: directory holding the idx .gz files (or ``<data_dir>/<dataset>/``).
        download: try to download missing files (md5-checked).
        verify: check the md5 sums of local files too.
        cache_dir: where the feature classifier is cached (``None``: see
            :func:`lossbalance.experiments.synthesis.default_cache_dir`).
        classifier_epochs: training epochs of the feature classifier.
        classifier_train_limit: train the feature classifier on the first N training
            images only (``None``: all of them, whatever ``train_limit``; tiny test runs).
        balanced_weights: the prescribed term weights (``None``: the experiment's).
        unbalanced_weights: the equal ("unbalanced") term weights (``None``: the
            experiment's).
        ablation: run MTAdam and its five Table 5 variants (when ``methods`` is None).
        samples: test images in the grid of samples (one per class first).
    """

    #: number of generator terms (length of the weight lists); set by each experiment
    num_terms: ClassVar[int] = 0

    lr: float = 2e-4
    beta1: float = 0.5
    d_lr: float | None = None
    data_dir: str = "data"
    download: bool = True
    verify: bool = True
    cache_dir: str | None = None
    classifier_epochs: int = 3
    classifier_train_limit: int | None = None
    balanced_weights: list[float] | None = None
    unbalanced_weights: list[float] | None = None
    ablation: bool = False
    samples: int = 10

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"Invalid beta1: {self.beta1} (expected 0 <= beta1 < 1)")
        if self.d_lr is not None and not 0 < self.d_lr < math.inf:
            raise ValueError(f"Invalid d_lr: {self.d_lr} (expected a finite d_lr > 0)")
        self.check_counts("classifier_epochs", "samples")
        limit = self.classifier_train_limit
        if limit is not None and (not isinstance(limit, int) or limit < 2):
            raise ValueError(
                f"Invalid classifier_train_limit: {limit!r} (expected an integer >= 2)"
            )
        for name in ("balanced_weights", "unbalanced_weights"):
            value = getattr(self, name)
            if value is None:
                continue
            if not all(math.isfinite(w) and w >= 0 for w in value):
                raise ValueError(f"Invalid {name}: {value} (expected finite weights >= 0)")
            if self.num_terms and len(value) != self.num_terms:
                raise ValueError(
                    f"Invalid {name}: {value} (expected {self.num_terms} weights, one per term)"
                )

    def gan_train_config(self) -> GanTrainConfig:
        """The :class:`GanTrainConfig` of these settings (device resolved)."""
        base = self.train_config()
        return GanTrainConfig(**vars(base), beta1=self.beta1, d_lr=self.d_lr)

    #: the datasets the experiment loads, each with its feature classifier
    classifier_datasets: ClassVar[tuple[str, ...]] = ("fashion-mnist",)

    def prepare(self) -> None:
        """Train and cache every feature classifier the experiment uses, so that parallel
        runs (``--jobs``) all load the same cached file instead of each training one."""
        self.load_datasets(resolve_device(self.device))

    def load_datasets(
        self, device: torch.device
    ) -> dict[str, tuple[ClassificationData, FashionClassifier, dict[str, Any]]]:
        """Each of :attr:`classifier_datasets` (whole) with its cached feature classifier
        and the classifier's record (see :meth:`feature_classifier`)."""
        out = {}
        for dataset in self.classifier_datasets:
            full = load_idx_dataset(
                dataset, Path(self.data_dir), download=self.download, verify=self.verify
            )
            out[dataset] = (full, *self.feature_classifier(full, device, dataset))
        return out

    def optimizers_note(self) -> str:
        """The table note's sentence on the discriminator's Adam and the rows' optimizers."""
        return (
            f"Adam (lr {self.d_lr or self.lr:g}, betas ({self.beta1:g}, 0.999)). "
            f"{self.epochs} epoch(s), batch {self.batch_size}, generator lr {self.lr:g} for "
            f"every row (Adam/MTAdam beta1 {self.beta1:g}, SGD-M momentum 0.9, RMSProp torch "
            "defaults)."
        )

    def feature_classifier(
        self, data: ClassificationData, device: torch.device, dataset: str = "fashion-mnist"
    ) -> tuple[FashionClassifier, dict[str, Any]]:
        """The cached classifier of FD-FMNIST and the perceptual loss, trained on the first
        ``classifier_train_limit`` training images of ``data`` (all when ``None``);
        ``dataset`` names the data in the cache key and file name."""
        cache = Path(self.cache_dir) if self.cache_dir else default_cache_dir(self.data_dir)
        data = data.limit(self.classifier_train_limit, None)
        cfg = ClassifierConfig(dataset=dataset, epochs=self.classifier_epochs)
        steps = cfg.epochs * math.ceil(int(data.train_y.shape[0]) / cfg.batch_size)
        bar = _bar(steps, f"{dataset} classifier", self.progress, 0, leave=False)
        try:
            return load_or_train_classifier(
                data, cache, cfg=cfg, device=device, progress=bar.update
            )
        finally:
            bar.close()

    def weights(
        self, default_balanced: Sequence[float], default_unbalanced: Sequence[float]
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (balanced, unbalanced) weights, checked against the number of terms."""
        out = []
        for name, given, default in (
            ("balanced_weights", self.balanced_weights, default_balanced),
            ("unbalanced_weights", self.unbalanced_weights, default_unbalanced),
        ):
            w = list(default if given is None else given)
            if len(w) != len(default):
                raise ValueError(
                    f"Invalid {name}: {w} (expected {len(default)} weights, one per term)"
                )
            out.append(tuple(float(v) for v in w))
        return out[0], out[1]


def method_names(cfg: GanConfig) -> list[str]:
    """The row names that ``cfg`` asks for (its methods, or the experiment's default rows:
    :data:`DEFAULT_METHODS`, or MTAdam's ablations when ``cfg.ablation``)."""
    return expand_methods(cfg.methods, list(ABLATIONS) if cfg.ablation else DEFAULT_METHODS)


def make_generator_stepper(
    spec: MethodSpec, generator: nn.Module, cfg: GanTrainConfig, num_terms: int
) -> Stepper:
    """The generator's optimizer of a row: Adam and MTAdam with ``betas[0] = beta1``,
    SGD with momentum 0.9, RMSProp with torch's defaults, all at ``cfg.lr``."""
    return make_stepper(spec, generator, None, cfg, num_terms, betas=(cfg.beta1, 0.999))


class _AdversarialStep:
    """One step of a run (discriminator, then generator), and the means of the unweighted
    terms and of the discriminator loss since the previous evaluation."""

    def __init__(
        self,
        task: GanTask,
        generator: nn.Module,
        discriminator: nn.Module,
        d_opt: torch.optim.Optimizer,
        stepper: Stepper,
        weights: Tensor,
    ) -> None:
        self.task = task
        self.generator = generator
        self.discriminator = discriminator
        self.d_opt = d_opt
        self.stepper = stepper
        self.weights = weights
        self.d_loss = torch.zeros(())
        # running sums of the unweighted terms and of the discriminator loss
        self.running = torch.zeros(
            int(weights.shape[0]) + 1, dtype=torch.float64, device=weights.device
        )
        self.running_steps = 0

    def __call__(self, index: Tensor) -> Tensor:
        task, discriminator = self.task, self.discriminator
        batch = task.train_batch(index)
        fake = task.generate(self.generator, batch)

        discriminator.requires_grad_(True)
        d_loss = task.discriminator_loss(discriminator, batch, fake)
        self.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_opt.step()
        self.d_loss = d_loss.detach()

        discriminator.requires_grad_(False)
        raw = task.generator_terms(self.generator, discriminator, batch, fake)
        terms = [w * t for w, t in zip(self.weights.unbind(0), raw, strict=True)]
        values = torch.stack([t.detach().reshape(()) for t in terms])
        raw_values = torch.stack([t.detach().reshape(()) for t in raw])
        self.running += torch.cat([raw_values, self.d_loss.reshape(1)]).double()
        self.running_steps += 1
        self.stepper.step(terms, None)
        return values

    def train_means(self) -> dict[str, float]:
        """``train_<term>`` and ``train_d`` since the previous call."""
        means = _floats(self.running / max(1, self.running_steps))
        self.running.zero_()
        self.running_steps = 0
        train = {f"train_{k}": v for k, v in zip(self.task.term_names, means, strict=False)}
        train["train_d"] = means[-1]
        return train


def train_gan_run(
    task: GanTask,
    spec: MethodSpec,
    seed: int,
    cfg: GanTrainConfig,
    *,
    group: str | None = None,
    label: str | None = None,
    position: int = 0,
) -> dict[str, Any]:
    """Train one row's generator and discriminator with one seed; return the run record.

    Seeding as in :func:`~lossbalance.experiments.harness.train_run`: every row of a seed
    starts from the same generator and discriminator weights and sees the same batches.
    """
    seed_everything(seed)
    device = cfg.device
    generator = task.build_generator().to(device)
    discriminator = task.build_discriminator().to(device)
    generator.train()
    discriminator.train()
    weights = task.term_weights(spec.balanced).to(device)
    stepper = make_generator_stepper(spec, generator, cfg, int(weights.shape[0]))
    d_params = list(discriminator.parameters())
    d_opt = torch.optim.Adam(d_params, lr=cfg.d_lr or cfg.lr, betas=(cfg.beta1, 0.999))
    step = _AdversarialStep(task, generator, discriminator, d_opt, stepper, weights)
    record = train_loop(
        task.num_train,
        step,
        lambda: task.evaluate(generator, cfg.eval_batch_size),
        stepper,
        spec,
        seed,
        weights,
        cfg,
        metric=task.metric,
        group=group,
        label=label,
        position=position,
        interval=step.train_means,
        trace_extra={"d_loss": lambda: float(step.d_loss)},
    )
    record["samples"] = encode_images(task.samples(generator))
    return record


def run_gan_experiment(
    task: GanTask,
    specs: Sequence[MethodSpec],
    seeds: Iterable[int],
    cfg: GanTrainConfig,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    classifier: str | None = None,
) -> list[dict[str, Any]]:
    """Train every (method, seed) and return the run records, rows outermost.

    ``previous`` and ``on_run`` as in
    :func:`~lossbalance.experiments.harness.run_experiment` (``--resume``). ``classifier``
    (the feature classifier's weight digest) is stored in each new record, so that a
    report can tell when resumed runs were measured with another classifier.
    """

    def train(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {**train_gan_run(*args, **kwargs), "classifier": classifier}

    return run_all([(None, task)], specs, seeds, cfg, train, previous=previous, on_run=on_run)


@dataclass
class GanSetup:
    """What every adversarial experiment's ``run`` starts from: the checked settings, the
    term weights, the rows, the training settings, the seeds, and each dataset (limited to
    ``train_limit`` / ``test_limit``) with its feature classifier and that classifier's
    record.

    Attributes:
        cfg: the experiment's settings.
        weights: ``(balanced, unbalanced)`` term weights.
        specs: the rows.
        train_cfg: the training settings (device resolved).
        seeds: run seeds.
        data: dataset name -> its (limited) data.
        classifiers: dataset name -> its feature classifier.
        classifier_info: dataset name -> the classifier's record (cache key, accuracy, ...).
        classifier_digest: the digest :meth:`train` stored in each new run's record.
    """

    cfg: GanConfig
    weights: tuple[tuple[float, ...], tuple[float, ...]]
    specs: list[MethodSpec]
    train_cfg: GanTrainConfig
    seeds: list[int]
    data: dict[str, ClassificationData]
    classifiers: dict[str, FashionClassifier]
    classifier_info: dict[str, dict[str, Any]]
    classifier_digest: str | None = None

    @classmethod
    def load(
        cls, cfg: GanConfig, balanced: Sequence[float], unbalanced: Sequence[float]
    ) -> GanSetup:
        """Check ``cfg``, resolve its weights (defaults ``balanced``, ``unbalanced``) and
        rows, load its datasets and feature classifiers; raises ``DatasetNotFoundError``
        without the data."""
        cfg.validate()
        weights = cfg.weights(balanced, unbalanced)
        specs = resolve_methods(method_names(cfg), weighted=True)
        train_cfg = cfg.gan_train_config()
        loaded = cfg.load_datasets(train_cfg.device)
        return cls(
            cfg=cfg,
            weights=weights,
            specs=specs,
            train_cfg=train_cfg,
            seeds=cfg.seed_list(),
            data={
                k: full.limit(cfg.train_limit, cfg.test_limit) for k, (full, _, _) in loaded.items()
            },
            classifiers={k: model for k, (_, model, _) in loaded.items()},
            classifier_info={k: info for k, (_, _, info) in loaded.items()},
        )

    @property
    def device(self) -> torch.device:
        return self.train_cfg.device

    def weights_note(self) -> str:
        """The table note's words on the weights of the two kinds of row."""
        return f"Balanced rows λ = {self.weights[0]}, Unbalanced rows λ = {self.weights[1]}"

    def train(
        self,
        task: GanTask,
        *,
        previous: Mapping[str, dict[str, Any]] | None = None,
        on_run: Callable[[dict[str, Any]], None] | None = None,
        classifier: str | None = None,
    ) -> list[dict[str, Any]]:
        """:func:`run_gan_experiment` of every row and seed; ``classifier`` (the feature
        classifiers' weight digest) is kept for :meth:`result`."""
        self.classifier_digest = classifier
        return run_gan_experiment(
            task,
            self.specs,
            self.seeds,
            self.train_cfg,
            previous=previous,
            on_run=on_run,
            classifier=classifier,
        )

    def result(
        self,
        task: GanTask,
        runs: list[dict[str, Any]],
        *,
        title: str,
        metric_label: str,
        columns: Sequence[Column],
        plot_keys: Sequence[str],
        notes: Sequence[str],
        test_size: int,
        classifier: dict[str, Any],
        extra: dict[str, Any] | None = None,
        references: dict[str, list[tuple[float, str]]] | None = None,
    ) -> ExperimentResult:
        """:func:`gan_result` of the runs of ``task`` (its name, main metric, term names
        and reference samples); the config records the settings, the resolved device and
        rows, the data sizes, the weights and ``classifier`` (the classifiers' records)."""
        config = {
            **asdict(self.cfg),
            "device": str(self.device),
            "methods": [s.name for s in self.specs],
        }
        config.update(
            train_size=task.num_train,
            test_size=test_size,
            weights={"balanced": list(self.weights[0]), "unbalanced": list(self.weights[1])},
            classifier=classifier,
        )
        return gan_result(
            task.name,
            title,
            config,
            self.specs,
            self.seeds,
            runs,
            metric=task.metric,
            metric_label=metric_label,
            columns=columns,
            plot_keys=plot_keys,
            term_names=list(task.term_names),
            notes=notes,
            sample_images=task.sample_references(),
            extra=extra,
            classifier=self.classifier_digest,
            references=references,
        )


def gan_result(
    name: str,
    title: str,
    config: dict[str, Any],
    specs: Sequence[MethodSpec],
    seeds: list[int],
    runs: list[dict[str, Any]],
    *,
    metric: str,
    metric_label: str,
    columns: Sequence[Column],
    plot_keys: Sequence[str],
    term_names: list[str],
    notes: Sequence[str],
    sample_images: list[tuple[str, dict[str, Any]]],
    extra: dict[str, Any] | None = None,
    classifier: str | None = None,
    references: dict[str, list[tuple[float, str]]] | None = None,
) -> ExperimentResult:
    """Summary (``metric``), Markdown table (every column, mean ± std over seeds), metric
    and training-loss plots, and the sample grid of an adversarial experiment.

    ``classifier`` is the weight digest of the feature classifier the notes describe (the
    one loaded by this command); the table warns when the runs were measured with another
    one, for example in a report of runs resumed on another machine."""
    rows = [s.label for s in specs]
    by_row = {row: [r for r in runs if r["row"] == row] for row in rows}
    summary = {row: summarize([r["final"][metric] for r in by_row[row]]) for row in rows}
    has_skips = any(r["skipped_steps"] is not None for r in runs)
    headers = ["Method", *(header for _, header, _ in columns), *cost_headers(has_skips)]
    table_rows = []
    for row in rows:
        row_runs = by_row[row]
        cells: list[Any] = [row]
        for key, _, digits in columns:
            cells.append(format_mean_std(summarize([r["final"][key] for r in row_runs]), digits))
        table_rows.append(cells + cost_cells(row_runs, has_skips))
    body = [markdown_table(headers, table_rows), ""]
    body += [f"- {note}" for note in notes]
    body.append(
        f"- {seeds_note(seeds, len(runs), len(rows) * len(seeds))}; mean ± sample std (ddof = 1) "
        "of the final test metrics. ms / iter: one discriminator and one generator step, "
        "evaluation excluded."
    )
    body += [f"- {note}" for note in protocol_note(config, runs)]
    body += [f"- {note}" for note in timing_note(config)]
    classifiers = {r.get("classifier") for r in runs}
    if len(classifiers) > 1:
        body.append(
            "- Warning: the runs were measured with different feature classifiers (weights "
            f"{', '.join(sorted(str(c) for c in classifiers))}), so their FD values are not "
            "comparable: a resumed command retrained the classifier instead of reusing the "
            "cached file. Keep --cache-dir (and its file) across the pieces of an experiment."
        )
    elif classifiers and classifier is not None and classifiers != {classifier}:
        (used,) = classifiers
        body.append(
            f"- Warning: the runs were measured with the feature classifier of weights {used}, "
            f"not with the one described above (weights {classifier}), which this command "
            "loaded or retrained: FD values compare only with runs of the same classifier."
        )
    for row in rows:
        diverged = sum(1 for r in by_row[row] if not math.isfinite(r["final"][metric]))
        if diverged:
            body.append(
                f"- {row}: {diverged} of {len(by_row[row])} runs diverged (non-finite outputs); "
                "their metrics are NaN, so the row's means are NaN (null in the JSON files)."
            )
    labels = dict((key, header) for key, header, _ in columns)
    losses = [(f"train_{t}", f"train {t} (unweighted)") for t in term_names]
    losses.append(("train_d", "train discriminator loss"))
    return ExperimentResult(
        name=name,
        title=title,
        config=config,
        seeds=seeds,
        rows=rows,
        runs=runs,
        metric=metric,
        metric_label=metric_label,
        summary=summary,
        table="\n".join(body),
        plot_metrics=[(key, labels[key]) for key in plot_keys],
        term_names=term_names,
        extra={**(extra or {}), "sample_images": [list(item) for item in sample_images]},
        extra_plots=[("losses.png", "training losses per evaluation interval", losses)],
        references=references or {},
    )
