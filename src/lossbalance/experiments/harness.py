"""The training loop of the experiments, for the three kinds of method.

- a torch optimizer (``sgd-m``, ``rmsprop``, ``adam``) on the sum of the terms;
- MTAdam on the list of terms (``opt.step(losses)`` computes the per-term gradients);
- a registry balancer with Adam: :func:`lossbalance.backward` writes ``.grad`` (the
  balanced combination on the shared parameters), then ``Adam.step()``.

The harness owns epochs, batches, devices, seeding, timing and logging; methods know
nothing of them. Every run is seeded (python ``random``, numpy, torch) so that a run is
reproducible and every method of a seed starts from the same weights, sees the same
batches in the same order and the same term weights.
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

import lossbalance
from lossbalance._base import Balancer
from lossbalance._registry import get_method
from lossbalance.experiments.methods import MethodSpec
from lossbalance.experiments.tasks import Task

__all__ = [
    "ExperimentConfig",
    "MissingRunError",
    "RecordedRuns",
    "TrainConfig",
    "make_stepper",
    "resolve_device",
    "run_all",
    "run_experiment",
    "run_key",
    "seed_everything",
    "train_loop",
    "train_run",
]


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (all devices)."""
    random.seed(seed)
    # the legacy global generator is what third-party code (and sklearn) draws from
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


_DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when available; a device that cannot train here is an error.

    Accepted: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (N below the number of GPUs)
    and ``"mps"`` where it is available. Anything else (``"tpu"``, ``"meta"``, a typo)
    raises ``ValueError`` before any data is read or any run starts.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Invalid device: {device!r} (expected {_DEVICES})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Invalid device: {device!r} (CUDA is not available on this machine)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"Invalid device: {device!r} (this machine has {count} CUDA device(s))"
            )
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise ValueError(f"Invalid device: {device!r} (expected {_DEVICES})")


@dataclass
class TrainConfig:
    """Settings of one training run (shared by every method of an experiment).

    Attributes:
        epochs: passes over the training set.
        batch_size: examples per step; the last batch of an epoch may be smaller.
        lr: learning rate of every optimizer.
        device: where to train.
        max_batches: cap on steps per epoch (tiny CI runs); ``None`` for a full epoch.
        evals_per_epoch: test evaluations per epoch (evenly spaced), besides the one
            before training.
        eval_batch_size: batch size of evaluation.
        log_dir: directory for per-run CSV logs of the trace (``None``: none).
        trace_points: about how many points of the per-term weight/magnitude trace to
            keep per run.
        grad_source: ``"params"`` (exact per-term gradients of the shared parameters) or
            ``"features"`` (of the shared feature, when the task has one) for gradient
            balancers.
        progress: show tqdm progress bars.
        threads: torch intra-op threads for the runs (``None``: unchanged).
    """

    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_batches: int | None = None
    evals_per_epoch: int = 1
    eval_batch_size: int = 1000
    trace_points: int = 200
    grad_source: str = "params"
    progress: bool = False
    threads: int | None = None
    log_dir: str | None = None


class Stepper(Protocol):
    """One optimisation step from the K loss terms of a batch."""

    def step(self, terms: list[Tensor], features: Tensor | None) -> None: ...

    def weights(self) -> Tensor | None: ...

    def magnitudes(self) -> Tensor | None: ...

    def skipped_steps(self) -> int | None: ...

    def negative_projection_steps(self) -> int | None: ...


class _SumStepper:
    """A torch optimizer on the plain sum of the (already weighted) terms."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, terms: list[Tensor], features: Tensor | None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        torch.stack(terms).sum().backward()
        self.optimizer.step()

    def weights(self) -> Tensor | None:
        return None

    def magnitudes(self) -> Tensor | None:
        return None

    def skipped_steps(self) -> int | None:
        return None

    def negative_projection_steps(self) -> int | None:
        return None


class _MultiTermOptimizerStepper:
    """MTAdam (or another optimizer-level method): ``step(losses)`` does the backward."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def step(self, terms: list[Tensor], features: Tensor | None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.step(terms)

    def weights(self) -> Tensor | None:
        return None

    def magnitudes(self) -> Tensor | None:
        # Mean over parameter tensors of each term's gradient-magnitude EMA n_{i,l}.
        if not hasattr(self.optimizer, "magnitudes"):
            return None
        mags = [m for m in self.optimizer.magnitudes().values() if m is not None]
        if not mags:
            return None
        return torch.stack([m.detach().double() for m in mags]).mean(0)

    def skipped_steps(self) -> int | None:
        skipped = getattr(self.optimizer, "skipped_steps", None)
        return None if skipped is None else int(skipped)

    def negative_projection_steps(self) -> int | None:
        return None


class _BalancerStepper:
    """A registry balancer via ``lossbalance.backward``, then the torch optimizer."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        balancer: Balancer,
        shared: nn.Module,
        use_features: bool,
    ) -> None:
        self.optimizer = optimizer
        self.balancer = balancer
        self.shared = shared
        self.use_features = use_features

    def step(self, terms: list[Tensor], features: Tensor | None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        feats = features if self.use_features else None
        lossbalance.backward(terms, self.balancer, shared=self.shared, features=feats)
        self.optimizer.step()

    def weights(self) -> Tensor | None:
        w = getattr(self.balancer, "last_weights", None)
        return None if w is None else w.detach()

    def magnitudes(self) -> Tensor | None:
        return None

    def skipped_steps(self) -> int | None:
        return None

    def negative_projection_steps(self) -> int | None:
        # IMTL-G and hybrid IMTL count the steps whose common projection is negative
        count = getattr(self.balancer, "negative_projection_steps", None)
        return None if count is None else int(count)


def _torch_optimizer(
    name: str, params: list[nn.Parameter], lr: float, adam: Mapping[str, Any]
) -> torch.optim.Optimizer:
    if name == "sgd-m":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **adam)
    raise ValueError(f"Invalid optimizer: {name!r} (expected one of 'sgd-m', 'rmsprop', 'adam')")


# Registry balancers whose defaults need a step the harness does not take: FAMO's logit
# update wants the losses after the model's step; with ``delayed=True`` it uses the next
# step's losses (the authors' code allows it), so no extra forward pass is timed.
_EXPERIMENT_OPTIONS: dict[str, dict[str, Any]] = {"famo": {"delayed": True}}


def make_stepper(
    spec: MethodSpec,
    model: nn.Module,
    task: Task | None,
    cfg: TrainConfig,
    num_terms: int,
    *,
    betas: tuple[float, float] | None = None,
) -> Stepper:
    """Build the optimizer (and balancer) of a row for a fresh model.

    SGD has momentum 0.9, RMSProp torch's defaults, every optimizer ``cfg.lr``. A balancer
    balances the gradients of ``task.shared(model)`` (of the whole model when ``task`` is
    ``None``). ``betas``: (beta1, beta2) of Adam and MTAdam (MTAdam's beta3 stays 0.9);
    ``None`` keeps their defaults.
    """
    params = list(model.parameters())
    adam: dict[str, Any] = {} if betas is None else {"betas": betas}
    if spec.kind == "optimizer":
        return _SumStepper(_torch_optimizer(spec.base, params, cfg.lr, adam))
    if spec.kind == "mtadam":
        mtadam = getattr(lossbalance, "MTAdam", None)
        if mtadam is None:
            raise RuntimeError("lossbalance.MTAdam is not available in this installation")
        mt_betas: dict[str, Any] = {} if betas is None else {"betas": (*betas, 0.9)}
        return _MultiTermOptimizerStepper(mtadam(params, lr=cfg.lr, **mt_betas, **spec.options))
    if spec.kind == "registry-optimizer":
        opt_cls = get_method(spec.base).factory(num_terms, **spec.options)
        return _MultiTermOptimizerStepper(opt_cls(params, lr=cfg.lr))
    if not hasattr(lossbalance, "backward"):
        raise RuntimeError("lossbalance.backward is not available in this installation")
    options = {**_EXPERIMENT_OPTIONS.get(spec.base, {}), **spec.options}
    balancer = lossbalance.create(spec.base, num_terms, **options).to(cfg.device)
    optimizer = torch.optim.Adam([*params, *balancer.parameters()], lr=cfg.lr, **adam)
    # a VectorBalancer that combines the parameters' per-term gradients (MoCo, DB-MTL,
    # ExcessMTL, MetaBalance) has no use for the features: exact mode, without the warning
    # of lossbalance.backward's fallback
    use_features = (
        cfg.grad_source == "features"
        and getattr(balancer, "kind", "") == "gradient"
        and (not getattr(balancer, "needs_grads", False) or balancer.accepts_features)
    )
    shared = model if task is None else task.shared(model)
    return _BalancerStepper(optimizer, balancer, shared, use_features)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool, position: int, leave: bool) -> Any:
    if not enabled:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional (extra "cli")
        return _NullBar()
    return tqdm(
        total=total, desc=desc, position=position, leave=leave, file=sys.stderr, dynamic_ncols=True
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _floats(t: Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().cpu().tolist()]


def train_run(
    task: Task,
    spec: MethodSpec,
    seed: int,
    cfg: TrainConfig,
    *,
    group: str | None = None,
    label: str | None = None,
    position: int = 0,
) -> dict[str, Any]:
    """Train one row with one seed; return its record for ``results.json``.

    The record holds the row label, method, group, seed, term weights, the test metrics
    before training and at every evaluation (``history``, with fractional ``epoch``), the
    final metrics, step count, training time (evaluation excluded) and time per
    iteration, the number of steps whose terms were not all finite, MTAdam's skipped
    steps when it counts them, IMTL-G's negative-projection steps (their count and the
    step numbers, ``None`` for other methods), and a subsampled trace of the terms, the
    balancer's weights and MTAdam's magnitudes.
    """
    seed_everything(seed)
    device = cfg.device
    model = task.build_model().to(device)
    model.train()
    weights = task.term_weights(seed, spec.balanced).to(device)
    stepper = make_stepper(spec, model, task, cfg, int(weights.shape[0]))

    def step(batch_index: Tensor) -> Tensor:
        terms, features = task.terms(model, task.train_batch(batch_index), weights)
        values = torch.stack([t.detach().reshape(()) for t in terms])
        stepper.step(terms, features)
        return values

    return train_loop(
        task.num_train,
        step,
        lambda: task.evaluate(model, cfg.eval_batch_size),
        stepper,
        spec,
        seed,
        weights,
        cfg,
        metric=task.metric,
        group=group,
        label=label,
        position=position,
    )


# Called once per process, by the first run that trains, after its first
# ``_ESTIMATE_AFTER`` steps: ``hook(steps_per_run, seconds_per_step)`` (the command line
# prints its time estimate from it). ``None``: nobody listens.
_first_steps_hook: Callable[[int, float], None] | None = None
_ESTIMATE_AFTER = 20


def set_first_steps_hook(hook: Callable[[int, float], None] | None) -> None:
    """Register what the first training run of this process reports after its first
    steps (steps per run, seconds per step); ``None`` removes it."""
    global _first_steps_hook
    _first_steps_hook = hook


def train_loop(
    num_train: int,
    step: Callable[[Tensor], Tensor],
    evaluate: Callable[[], dict[str, float]],
    stepper: Stepper,
    spec: MethodSpec,
    seed: int,
    weights: Tensor,
    cfg: TrainConfig,
    *,
    metric: str,
    group: str | None = None,
    label: str | None = None,
    position: int = 0,
    interval: Callable[[], dict[str, float]] | None = None,
    trace_extra: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """The epochs of one run: batches, evaluations, timing, trace and the run record.

    The caller has seeded the run and built the model and ``stepper``. ``step`` takes the
    batch's indices into the ``num_train`` training examples (on ``cfg.device``), takes
    the optimisation step(s) and returns the K weighted term values (detached), which the
    loop checks for finiteness and traces. ``evaluate`` returns the test metrics (the
    ``final`` ones are those of the last evaluation; ``metric`` is shown on the progress
    bar); ``interval``, if given, what else to store in each history entry after the first
    (training means since the previous evaluation, say); ``trace_extra`` maps more trace
    keys to what to record at each trace point. Returns the record described in
    :func:`train_run`.
    """
    device = cfg.device
    order_gen = torch.Generator().manual_seed(seed)
    batches_per_epoch = math.ceil(num_train / cfg.batch_size)
    if cfg.max_batches is not None:
        batches_per_epoch = min(batches_per_epoch, cfg.max_batches)
    total_steps = batches_per_epoch * cfg.epochs
    trace_every = max(1, total_steps // max(1, cfg.trace_points))
    evals = max(1, cfg.evals_per_epoch)
    eval_after = {max(1, round((j + 1) * batches_per_epoch / evals)) for j in range(evals)}

    metrics = evaluate()
    history: list[dict[str, float]] = [{"epoch": 0.0, "step": 0, **metrics}]
    extra = dict(trace_extra or {})
    trace: dict[str, list[Any]] = {"step": [], "losses": [], "weights": [], "magnitudes": []}
    trace.update({key: [] for key in extra})
    row = label or spec.label
    logger = _term_logger(cfg.log_dir, group, row, seed)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    # the steps at which IMTL-G's common projection was negative (its counter, a host int)
    negative_seen = stepper.negative_projection_steps()
    negative_at: list[int] | None = None if negative_seen is None else []
    train_time = 0.0
    steps = 0
    bar = _bar(total_steps, f"{row} s{seed}", cfg.progress, position, leave=False)
    for epoch in range(cfg.epochs):
        order = torch.randperm(num_train, generator=order_gen)
        order = order[: batches_per_epoch * cfg.batch_size]
        _sync(device)
        start = time.perf_counter()
        for b, index in enumerate(order.split(cfg.batch_size)):
            values = step(index.to(device))
            nonfinite += (~torch.isfinite(values).all()).long()
            steps += 1
            if steps == min(_ESTIMATE_AFTER, total_steps) and _first_steps_hook is not None:
                hook = _first_steps_hook
                set_first_steps_hook(None)
                _sync(device)
                hook(total_steps, (train_time + time.perf_counter() - start) / steps)
            if negative_at is not None and negative_seen is not None:
                count = stepper.negative_projection_steps() or 0
                negative_at += [steps] * (count - negative_seen)
                negative_seen = count
            bar.update()
            record = steps % trace_every == 0 or steps == 1
            evaluating = (b + 1) in eval_after
            if record or evaluating:
                _sync(device)
                train_time += time.perf_counter() - start
                if record:
                    trace["step"].append(steps)
                    trace["losses"].append(_floats(values))
                    for key, read in extra.items():
                        trace[key].append(read())
                    w = stepper.weights()
                    trace["weights"].append(None if w is None else _floats(w))
                    m = stepper.magnitudes()
                    trace["magnitudes"].append(None if m is None else _floats(m))
                    if logger is not None:
                        logger.log(values, weights=w, magnitudes=m, step=steps)
                if evaluating:
                    more = interval() if interval is not None else {}
                    metrics = evaluate()
                    history.append(
                        {
                            "epoch": epoch + (b + 1) / batches_per_epoch,
                            "step": steps,
                            **metrics,
                            **more,
                        }
                    )
                    bar.set_postfix_str(f"{metric}={metrics[metric]:.4g}")
                start = time.perf_counter()
        _sync(device)
        train_time += time.perf_counter() - start
    bar.close()
    if logger is not None:
        logger.close()
    for key in ("weights", "magnitudes"):
        if all(v is None for v in trace[key]):
            trace[key] = []
    return {
        "row": row,
        "method": spec.name,
        "kind": spec.kind,
        "group": group,
        "seed": seed,
        "term_weights": _floats(weights),
        "history": history,
        "final": dict(metrics),
        "steps": steps,
        "train_time_s": train_time,
        "time_per_iter_s": train_time / max(1, steps),
        "nonfinite_steps": int(nonfinite),
        "skipped_steps": stepper.skipped_steps(),
        "negative_projection_steps": stepper.negative_projection_steps(),
        "negative_projection_at": negative_at,
        "trace": trace,
    }


def _term_logger(log_dir: str | None, group: str | None, row: str, seed: int) -> Any:
    """A CSV :class:`~lossbalance.TermLogger` per run under ``log_dir``, or ``None``."""
    if log_dir is None:
        return None
    name = "-".join(part for part in (group, row, f"seed{seed}") if part)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return lossbalance.TermLogger(every=1, csv=Path(log_dir) / f"{name}.csv")


class MissingRunError(LookupError):
    """A run that ``--report-only`` needs is not among the recorded ones."""


class RecordedRuns(dict[str, dict[str, Any]]):
    """Previous runs (as ``previous``) from which a report is made without training
    (``--report-only``): a run that is not here is left out and listed in ``missing``
    (``(row, seed)`` pairs); a row without any recorded run raises
    :class:`MissingRunError`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.missing: list[tuple[str, int]] = []


def run_key(group: str | None, row: str, seed: int) -> str:
    """Identity of a run within an experiment (for resuming)."""
    return f"{group}|{row}|{seed}"


def run_experiment(
    tasks: Sequence[tuple[str | None, Task]],
    specs: Sequence[MethodSpec],
    seeds: Iterable[int],
    cfg: TrainConfig,
    *,
    label: Callable[[MethodSpec, str | None], str] | None = None,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every (group, method, seed) and return the run records in that order.

    Args:
        tasks: ``(group, task)`` pairs; ``group`` names a column group (``None`` for one).
        specs: the rows.
        seeds: run seeds.
        cfg: training settings.
        label: row label of a method in a group (default: the method's label).
        previous: records of runs already done with the same settings, by
            :func:`run_key`; they are reused instead of trained again (``--resume``).
        on_run: called with each new record as soon as its run ends (checkpointing).
    """
    return run_all(
        tasks, specs, seeds, cfg, train_run, label=label, previous=previous, on_run=on_run
    )


def run_all(
    tasks: Sequence[tuple[str | None, Any]],
    specs: Sequence[MethodSpec],
    seeds: Iterable[int],
    cfg: TrainConfig,
    train: Callable[..., dict[str, Any]],
    *,
    label: Callable[[MethodSpec, str | None], str] | None = None,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_experiment` with another training function: ``train(task, spec, seed,
    cfg, group=..., label=..., position=...)`` returns a run's record, as
    :func:`train_run` does (the adversarial experiments pass theirs). Every task has
    ``to(device)``; it is moved to ``cfg.device`` before its first new run."""
    seeds = list(seeds)
    if previous is None:
        previous = {}
    total = len(tasks) * len(specs) * len(seeds)
    outer = _bar(total, "runs", cfg.progress, 0, leave=True)
    runs = []
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        for group, task in tasks:
            moved = False
            for spec in specs:
                row = label(spec, group) if label is not None else spec.label
                for seed in seeds:
                    key = run_key(group, row, seed)
                    if key in previous:
                        runs.append(previous[key])
                    elif isinstance(previous, RecordedRuns):
                        previous.missing.append((row, seed))
                    else:
                        if not moved:
                            task.to(cfg.device)
                            moved = True
                        record = train(task, spec, seed, cfg, group=group, label=row, position=1)
                        runs.append(record)
                        if on_run is not None:
                            on_run(record)
                    outer.update()
    finally:
        torch.set_num_threads(threads)
        outer.close()
    if isinstance(previous, RecordedRuns):
        empty = sorted({row for row, _ in previous.missing} - {r["row"] for r in runs})
        if empty:
            raise MissingRunError(
                f"no recorded run of {', '.join(map(repr, empty))} with these settings"
            )
    return runs


@dataclass
class ExperimentConfig:
    """Settings common to every experiment (each experiment sets its own defaults).

    Attributes:
        methods: method names (see :mod:`lossbalance.experiments.methods`); ``None`` for
            the experiment's default rows, ``["all"]`` for every known method.
        seeds: number of seeds per row; seeds are ``first_seed .. first_seed + seeds - 1``.
        first_seed: first seed.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        epochs: passes over the training set.
        batch_size: training batch size.
        lr: learning rate of every optimizer.
        max_batches: cap on steps per epoch (tiny CI runs).
        train_limit: use only the first N training examples.
        test_limit: evaluate on the first N test examples only.
        evals_per_epoch: test evaluations per epoch.
        progress: show progress bars.
        threads: torch intra-op threads during the runs (restored afterwards); ``None``
            keeps torch's setting. Tiny CPU models run fastest on one thread.
        log_dir: if set, every run writes its per-term losses, weights and magnitudes at
            the trace points to ``log_dir/<row>-seed<N>.csv`` (:class:`~lossbalance.TermLogger`).
        jobs: runs trained at once in separate processes by the command line
            (:func:`lossbalance.experiments.parallel.run_parallel`); recorded so that the
            report can say that its times per iteration were measured side by side.
    """

    methods: list[str] | None = None
    seeds: int = 3
    first_seed: int = 0
    device: str = "auto"
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    max_batches: int | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    evals_per_epoch: int = 1
    progress: bool = False
    threads: int | None = None
    log_dir: str | None = None
    jobs: int = 1

    def validate(self) -> None:
        """Check the values with torch-style messages."""
        self.check_counts("seeds", "epochs", "batch_size", "evals_per_epoch", "jobs")
        self.check_counts("max_batches", "train_limit", "test_limit", "threads", optional=True)
        if not isinstance(self.first_seed, int) or self.first_seed < 0:
            raise ValueError(f"Invalid first_seed: {self.first_seed!r} (expected an integer >= 0)")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"Invalid lr: {self.lr} (expected a finite lr > 0)")

    def check_counts(self, *names: str, optional: bool = False) -> None:
        """Check that the named settings are integers >= 1 (or ``None`` when ``optional``)."""
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")

    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The :class:`TrainConfig` of these settings (device resolved)."""
        values: dict[str, Any] = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "device": resolve_device(self.device),
            "max_batches": self.max_batches,
            "evals_per_epoch": self.evals_per_epoch,
            "progress": self.progress,
            "threads": self.threads,
            "log_dir": None if self.log_dir is None else str(self.log_dir),
        }
        values.update(overrides)
        return TrainConfig(**values)
