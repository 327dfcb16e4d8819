"""Train an experiment's runs several at once, in separate processes (``--jobs N``).

One run of these experiments is a small model that leaves a GPU mostly idle: the step is
bound by Python and kernel launches, not by arithmetic. Training N runs side by side in N
processes uses the device and the CPU cores far better. Each (method, seed) pair becomes
one task: a spawned worker calls the experiment's own ``run`` with just that method and
seed, so a run trained here is the run a one-process command trains (same seed, same code
path); only its wall-clock times differ, since the runs share the device. The records come
back to the parent, which checkpoints each one as it arrives (``runs.jsonl``, as
``--resume`` reads) and finally assembles the report with the usual ``run`` over the
finished records, which trains nothing.

Workers are started with ``spawn`` (CUDA cannot be used in a forked child), use
``threads`` CPU threads each (default: the cores divided among the jobs), and exit when
the parent process dies (a time limit, a kill), so that no orphan keeps the device busy;
the runs finished by then are in the checkpoint.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import importlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from lossbalance.experiments.harness import _bar, run_key

__all__ = ["run_parallel"]


def _watch_parent(parent: int) -> None:
    # Worker initializer: leave as soon as the parent is gone (killed by a time limit, say),
    # instead of training on for nobody and holding the device.
    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="lossbalance-parent-watch", daemon=True).start()


def _worker(
    module_name: str, cfg: Any, previous: Mapping[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    # Runs in a spawned process: train the runs of ``cfg`` (one method, one seed) that
    # ``previous`` lacks and return their records.
    module = importlib.import_module(module_name)
    records: list[dict[str, Any]] = []
    module.run(cfg, previous=previous, on_run=records.append)
    return records


def run_parallel(
    module: Any,
    cfg: Any,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """Run ``module.run(cfg)`` with ``cfg.jobs`` processes training (method, seed) pairs.

    ``module`` is an experiment module (``mnist``, ``pix2pix``, ...) with ``method_names``
    and ``run``; ``previous`` and ``on_run`` as in its ``run``. Returns the same
    :class:`~lossbalance.experiments.report.ExperimentResult` as ``module.run(cfg)``.
    """
    previous = dict(previous or {})
    jobs = int(cfg.jobs)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // jobs)
    prepare = getattr(cfg, "prepare", None)
    if prepare is not None:  # e.g. train the cached feature classifier once, here
        prepare()
    tasks = [
        dataclasses.replace(
            cfg, methods=[name], seeds=1, first_seed=seed, progress=False, threads=threads
        )
        for name in module.method_names(cfg)
        for seed in cfg.seed_list()
    ]
    bar = _bar(len(tasks), f"runs ({jobs} at once)", cfg.progress, 0, leave=True)
    context = multiprocessing.get_context("spawn")
    try:
        with futures.ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=context,
            initializer=_watch_parent,
            initargs=(os.getpid(),),
        ) as pool:
            pending = {
                pool.submit(_worker, module.__name__, task, previous): task for task in tasks
            }
            try:
                for done in futures.as_completed(pending):
                    task = pending[done]
                    for record in done.result():
                        previous[run_key(record["group"], record["row"], record["seed"])] = record
                        if on_run is not None:
                            on_run(record)
                    bar.set_postfix_str(f"{task.methods[0]} seed {task.first_seed}")
                    bar.update()
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        bar.close()
    # every run is in ``previous`` now: this trains nothing and builds the report
    return module.run(dataclasses.replace(cfg, progress=False), previous=previous)
