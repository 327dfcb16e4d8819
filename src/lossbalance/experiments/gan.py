"""The training loop of the adversarial experiments (pix2pix, SRGAN, CycleGAN).

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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor, nn

import lossbalance
from lossbalance._registry import get_method
from lossbalance.experiments.data import ClassificationData, load_idx_dataset
from lossbalance.experiments.harness import (
    ExperimentConfig,
    Stepper,
    TrainConfig,
    _BalancerStepper,
    _bar,
    _floats,
    _MultiTermOptimizerStepper,
    _SumStepper,
    _sync,
    _term_logger,
    resolve_device,
    run_key,
    seed_everything,
)
from lossbalance.experiments.methods import MethodSpec
from lossbalance.experiments.report import (
    ExperimentResult,
    encode_images,
    format_mean_std,
    markdown_table,
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
    "GanConfig",
    "GanTask",
    "GanTrainConfig",
    "gan_result",
    "make_generator_stepper",
    "run_gan_experiment",
    "train_gan_run",
]


class GanTask(Protocol):
    """What the adversarial loop needs of an experiment.

    ``generator_terms`` returns the K unweighted terms; the loop multiplies them by the
    row's weights (``term_weights``). ``samples`` returns uint8 images ``(S, H, W)``: the
    generator's outputs for the task's fixed sample inputs.
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
        if self.d_lr is not None and not self.d_lr > 0:
            raise ValueError(f"Invalid d_lr: {self.d_lr} (expected d_lr > 0)")
        for name in ("classifier_epochs", "samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
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

    #: datasets whose feature classifier the experiment uses
    classifier_datasets: ClassVar[tuple[str, ...]] = ("fashion-mnist",)

    def prepare(self) -> None:
        """Train and cache every feature classifier the experiment uses, so that parallel
        runs (``--jobs``) all load the same cached file instead of each training one."""
        device = resolve_device(self.device)
        for dataset in self.classifier_datasets:
            full = load_idx_dataset(
                dataset, Path(self.data_dir), download=self.download, verify=self.verify
            )
            self.feature_classifier(full, device, dataset)

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


def make_generator_stepper(
    spec: MethodSpec, generator: nn.Module, cfg: GanTrainConfig, num_terms: int
) -> Stepper:
    """The generator's optimizer of a row: Adam and MTAdam with ``betas[0] = beta1``,
    SGD with momentum 0.9, RMSProp with torch's defaults, all at ``cfg.lr``."""
    params = list(generator.parameters())
    betas = (cfg.beta1, 0.999)
    if spec.kind == "optimizer":
        opt: torch.optim.Optimizer
        if spec.base == "sgd-m":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
        elif spec.base == "rmsprop":
            opt = torch.optim.RMSprop(params, lr=cfg.lr)
        elif spec.base == "adam":
            opt = torch.optim.Adam(params, lr=cfg.lr, betas=betas)
        else:
            raise ValueError(
                f"Invalid optimizer: {spec.base!r} (expected one of 'sgd-m', 'rmsprop', 'adam')"
            )
        return _SumStepper(opt)
    if spec.kind == "mtadam":
        mtadam = lossbalance.MTAdam(params, lr=cfg.lr, betas=(*betas, 0.9), **spec.options)
        return _MultiTermOptimizerStepper(mtadam)
    if spec.kind == "registry-optimizer":
        opt_cls = get_method(spec.base).factory(num_terms, **spec.options)
        return _MultiTermOptimizerStepper(opt_cls(params, lr=cfg.lr))
    balancer = lossbalance.create(spec.base, num_terms, **spec.options).to(cfg.device)
    optimizer = torch.optim.Adam([*params, *balancer.parameters()], lr=cfg.lr, betas=betas)
    return _BalancerStepper(optimizer, balancer, generator, use_features=False)


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
    num_terms = int(weights.shape[0])
    stepper = make_generator_stepper(spec, generator, cfg, num_terms)
    d_params = list(discriminator.parameters())
    d_opt = torch.optim.Adam(d_params, lr=cfg.d_lr or cfg.lr, betas=(cfg.beta1, 0.999))
    order_gen = torch.Generator().manual_seed(seed)

    n = task.num_train
    batches_per_epoch = math.ceil(n / cfg.batch_size)
    if cfg.max_batches is not None:
        batches_per_epoch = min(batches_per_epoch, cfg.max_batches)
    total_steps = batches_per_epoch * cfg.epochs
    trace_every = max(1, total_steps // max(1, cfg.trace_points))
    evals = max(1, cfg.evals_per_epoch)
    eval_after = {max(1, round((j + 1) * batches_per_epoch / evals)) for j in range(evals)}

    history: list[dict[str, float]] = [
        {"epoch": 0.0, "step": 0, **task.evaluate(generator, cfg.eval_batch_size)}
    ]
    trace: dict[str, list[Any]] = {
        "step": [],
        "losses": [],
        "weights": [],
        "magnitudes": [],
        "d_loss": [],
    }
    logger = _term_logger(cfg.log_dir, group, label or spec.label, seed)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    # running sums of the unweighted terms and of the discriminator loss, read at evaluations
    running = torch.zeros(num_terms + 1, dtype=torch.float64, device=device)
    running_steps = 0
    train_time = 0.0
    step = 0
    row = label or spec.label
    bar = _bar(total_steps, f"{row} s{seed}", cfg.progress, position, leave=False)
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=order_gen)[: batches_per_epoch * cfg.batch_size]
        _sync(device)
        start = time.perf_counter()
        for b, index in enumerate(order.split(cfg.batch_size)):
            batch = task.train_batch(index.to(device))
            fake = task.generate(generator, batch)

            discriminator.requires_grad_(True)
            d_loss = task.discriminator_loss(discriminator, batch, fake)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()

            discriminator.requires_grad_(False)
            raw = task.generator_terms(generator, discriminator, batch, fake)
            terms = [w * t for w, t in zip(weights.unbind(0), raw, strict=True)]
            values = torch.stack([t.detach().reshape(()) for t in terms])
            raw_values = torch.stack([t.detach().reshape(()) for t in raw])
            nonfinite += (~torch.isfinite(values).all()).long()
            running += torch.cat([raw_values, d_loss.detach().reshape(1)]).double()
            running_steps += 1
            stepper.step(terms, None)
            step += 1
            bar.update()
            record = step % trace_every == 0 or step == 1
            evaluate = (b + 1) in eval_after
            if record or evaluate:
                _sync(device)
                train_time += time.perf_counter() - start
                if record:
                    trace["step"].append(step)
                    trace["losses"].append(_floats(values))
                    trace["d_loss"].append(float(d_loss.detach()))
                    w = stepper.weights()
                    trace["weights"].append(None if w is None else _floats(w))
                    m = stepper.magnitudes()
                    trace["magnitudes"].append(None if m is None else _floats(m))
                    if logger is not None:
                        logger.log(values, weights=w, magnitudes=m, step=step)
                if evaluate:
                    means = _floats(running / max(1, running_steps))
                    running.zero_()
                    running_steps = 0
                    train = {f"train_{k}": v for k, v in zip(task.term_names, means, strict=False)}
                    train["train_d"] = means[-1]
                    metrics = task.evaluate(generator, cfg.eval_batch_size)
                    history.append(
                        {
                            "epoch": epoch + (b + 1) / batches_per_epoch,
                            "step": step,
                            **metrics,
                            **train,
                        }
                    )
                    bar.set_postfix_str(f"{task.metric}={metrics[task.metric]:.4g}")
                start = time.perf_counter()
        _sync(device)
        train_time += time.perf_counter() - start
    bar.close()
    if logger is not None:
        logger.close()
    for key in ("weights", "magnitudes"):
        if all(v is None for v in trace[key]):
            trace[key] = []
    final = {
        k: v
        for k, v in history[-1].items()
        if k not in ("epoch", "step") and not k.startswith("train_")
    }
    return {
        "row": row,
        "method": spec.name,
        "kind": spec.kind,
        "group": group,
        "seed": seed,
        "term_weights": _floats(weights),
        "history": history,
        "final": final,
        "steps": step,
        "train_time_s": train_time,
        "time_per_iter_s": train_time / max(1, step),
        "nonfinite_steps": int(nonfinite),
        "skipped_steps": stepper.skipped_steps(),
        "trace": trace,
        "samples": encode_images(task.samples(generator)),
    }


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
    seeds = list(seeds)
    previous = previous or {}
    outer = _bar(len(specs) * len(seeds), "runs", cfg.progress, 0, leave=True)
    runs = []
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        moved = False
        for spec in specs:
            for seed in seeds:
                key = run_key(None, spec.label, seed)
                if key in previous:
                    runs.append(previous[key])
                else:
                    if not moved:
                        task.to(cfg.device)
                        moved = True
                    record = train_gan_run(task, spec, seed, cfg, label=spec.label, position=1)
                    record["classifier"] = classifier
                    runs.append(record)
                    if on_run is not None:
                        on_run(record)
                outer.update()
    finally:
        torch.set_num_threads(threads)
        outer.close()
    return runs


#: a table column: (metric key, header, decimals)
Column = tuple[str, str, int]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


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
) -> ExperimentResult:
    """Summary (``metric``), Markdown table (every column, mean ± std over seeds), metric
    and training-loss plots, and the sample grid of an adversarial experiment."""
    rows = [s.label for s in specs]
    by_row = {row: [r for r in runs if r["row"] == row] for row in rows}
    summary = {row: summarize([r["final"][metric] for r in by_row[row]]) for row in rows}
    headers = ["Method", *(header for _, header, _ in columns), "n", "ms / iter"]
    headers.append("non-finite steps / run")
    has_skips = any(r["skipped_steps"] is not None for r in runs)
    if has_skips:
        headers.append("MTAdam skipped steps / run")
    table_rows = []
    for row in rows:
        row_runs = by_row[row]
        cells: list[Any] = [row]
        for key, _, digits in columns:
            cells.append(format_mean_std(summarize([r["final"][key] for r in row_runs]), digits))
        ms = 1000 * (_mean([r["time_per_iter_s"] for r in row_runs]) or float("nan"))
        nonfinite = _mean([float(r["nonfinite_steps"]) for r in row_runs])
        cells += [len(row_runs), f"{ms:.2f}", "-" if nonfinite is None else f"{nonfinite:.1f}"]
        if has_skips:
            skipped = _mean([r["skipped_steps"] for r in row_runs])
            cells.append("-" if skipped is None else f"{skipped:.1f}")
        table_rows.append(cells)
    body = [markdown_table(headers, table_rows), ""]
    body += [f"- {note}" for note in notes]
    body.append(
        f"- Seeds {seeds[0]}..{seeds[-1]} ({len(seeds)} per row); mean ± sample std (ddof = 1) "
        "of the final test metrics. ms / iter: one discriminator and one generator step, "
        "evaluation excluded."
    )
    body += [f"- {note}" for note in timing_note(config)]
    classifiers = {r.get("classifier") for r in runs}
    if len(classifiers) > 1:
        body.append(
            "- Warning: the runs were measured with different feature classifiers (weights "
            f"{', '.join(sorted(str(c) for c in classifiers))}), so their FD values are not "
            "comparable: a resumed command retrained the classifier instead of reusing the "
            "cached file. Keep --cache-dir (and its file) across the pieces of an experiment."
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
    )
