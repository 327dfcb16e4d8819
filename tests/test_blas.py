"""The gradient-level balancers' K x K NumPy solves run on one BLAS thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import lossbalance.functional as F
from lossbalance.methods import _blas
from lossbalance.methods._blas import single_blas_thread

# the BLAS libraries that can run on two threads: a process may also hold a BLAS built
# for one thread (another package's), which no limit can raise and no test should watch
_THREADED: set[str] = set()


def _blas_threads() -> list[int]:
    return [
        lib["num_threads"]
        for lib in threadpool_info()
        if lib["user_api"] == "blas" and (not _THREADED or lib["filepath"] in _THREADED)
    ]


@pytest.fixture
def two_blas_threads():
    _THREADED.clear()
    if not _blas_threads():
        pytest.skip("NumPy's BLAS is not visible to threadpoolctl")
    with threadpool_limits(limits=2, user_api="blas"):
        libs = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
        _THREADED.update(lib["filepath"] for lib in libs if lib["num_threads"] == 2)
        if not _THREADED:
            pytest.skip("no BLAS library here can run on two threads")
        assert set(_blas_threads()) == {2}
        yield
    _THREADED.clear()


def test_one_thread_inside_and_restored_after_return_and_error(two_blas_threads):
    seen = []

    @single_blas_thread
    def solve(fail: bool = False) -> None:
        seen.append(_blas_threads())
        if fail:
            raise RuntimeError("boom")

    solve()
    with pytest.raises(RuntimeError, match="boom"):
        solve(fail=True)
    assert seen == [[1] * len(seen[0])] * 2
    assert set(_blas_threads()) == {2}


def test_nested_and_concurrent_calls_restore_the_original_count(two_blas_threads):
    seen = []

    @single_blas_thread
    def inner() -> None:
        seen.append(set(_blas_threads()))

    @single_blas_thread
    def outer() -> None:
        inner()  # leaving the inner call must not lift the outer call's limit
        seen.append(set(_blas_threads()))

    outer()
    assert seen == [{1}, {1}]
    assert set(_blas_threads()) == {2}

    # two threads inside at once: the limit is lifted once, when the last one leaves
    inside = threading.Barrier(2)
    both = single_blas_thread(lambda: inside.wait(timeout=10))
    threads = [threading.Thread(target=both) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(_blas_threads()) == {2}
    assert _blas._depth == 0 and not _blas._saved


@pytest.mark.parametrize(
    "weights",
    [
        F.imtl_g_weights,
        F.mgda_weights,
        F.mgda_closed_form_weights,
        F.pcgrad_weights,
        F.grad_normalization_weights,
    ],
)
def test_the_balancers_solve_on_one_thread(two_blas_threads, monkeypatch, weights):
    seen = []
    for name in ("eigh", "lstsq"):
        original = getattr(np.linalg, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(set(_blas_threads()))
            return _original(*args, **kwargs)

        monkeypatch.setattr(np.linalg, name, spy)
    matrix = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights(matrix)
    assert seen and all(s == {1} for s in seen)
    assert set(_blas_threads()) == {2}
