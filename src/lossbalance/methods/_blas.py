"""One BLAS thread for the small K x K NumPy solves of the gradient-level balancers.

NumPy's OpenBLAS runs a 40 x 40 ``eigh`` on all the cores it sees, and its threads cost
far more than the work: on the 2-core development machine, under load, one call took
0.9-1.7 ms on average with the default threads and 0.33 ms with one. IMTL-G, MGDA,
PCGrad and GradNorm call such solves every step. :func:`single_blas_thread` runs them on
one thread through ``threadpoolctl`` (process-wide, like every BLAS thread setting: a
BLAS call in another Python thread during the few hundred microseconds of a solve also
runs on one thread).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["single_blas_thread"]

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_depth = 0
_saved: list[tuple[Any, int]] = []  # (library controller, its thread count on entry)
_libraries: list[Any] | None = None


def _blas_libraries() -> list[Any]:
    # Found once: threadpoolctl inspects the loaded shared libraries (a few milliseconds).
    global _libraries
    if _libraries is None:
        from threadpoolctl import ThreadpoolController

        controllers = ThreadpoolController().lib_controllers
        _libraries = [lib for lib in controllers if lib.user_api == "blas"]
    return _libraries


def single_blas_thread(fn: F) -> F:
    """Decorate ``fn`` so that NumPy's BLAS/LAPACK run on one thread during its calls.

    Calls nest and may come from several Python threads: the limit is set by the first
    call that enters and the original thread counts come back when the last one leaves.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _depth
        with _lock:
            if _depth == 0:
                for lib in _blas_libraries():
                    threads = lib.get_num_threads()
                    if threads is not None and threads != 1:
                        _saved.append((lib, threads))
                        lib.set_num_threads(1)
            _depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    while _saved:
                        lib, threads = _saved.pop()
                        lib.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]
